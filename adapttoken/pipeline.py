"""AdaptToken and AdaptToken-Lite composed from the steps, plus the final answer pass.

`ask()` is the whole method in one call; the nodes assemble the same steps one by one:
open_video -> split_groups -> RankedGroups -> score_groups [-> early_stop] -> allocate -> answer.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from .budget import GroupReport, Selection, allocate, check_budget, even_split, uniform_frames
from .decode import open_video
from .entropy import early_stop, response_entropy, score_groups
from .errors import InputError
from .evidence import key_moments
from .groups import split_groups
from .memory import out_of_memory
from .models.loading import Model
from .question import NO_HOOKS, Hooks, Question
from .rank import RankedGroups

METHODS = ("adapttoken", "lite", "even_split", "uniform")


@dataclass
class AdaptTokenConfig:
    """Every knob of the method. [paper] values where the paper states them, else [ours]."""
    # sampling [ours]
    num_frames: int = 1024          # paper: 4096; lighter default for consumer GPUs
    max_fps: float | None = None
    start: float = 0.0
    end: float | None = None
    max_pixels: int | None = 308 * 560   # FlexSelect's cap: 220 tokens per 2-frame slice
    min_pixels: int | None = None
    # groups [ours, following FlexSelect]
    group_size: int = 64            # temporal slices per group
    layout: str = "strided"
    # group pass [paper; layer from FlexSelect]
    layer: int | None = None        # None: the family's default (20 of 28 for Qwen2.5-VL-7B)
    aggregation: str = "max"
    entropy_mode: str = "auto"      # options for multiple choice, first_token for open questions
    entropy_tokens: int = 1         # m for greedy_mean
    # budget [ours]
    budget: int = 7040              # FlexSelect's total for Qwen2.5-VL-7B
    relevance: str = "linear"
    tau: float = 0.1
    floor: int = 0
    redundancy_threshold: float | None = 0.9
    # Lite [ours]
    stop_threshold: float = 0.2
    min_groups: int = 1
    stop_confirm: int = 2           # confident groups that must agree on the answer (1: the paper's
                                    # first confident group; entropy.StopRule)
    stop_check_answer: bool = True  # and the answer over the tokens chosen so far (StopRule.check_answer)
    # answer
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # performance [ours]: where features live, decoding threads, on-disk feature cache
    feature_device: str = "auto"    # auto: on the GPU up to 20% of its memory, else CPU memory
    decode_workers: int | None = None   # decoder threads (None: half the cores, 1..8; 0: none)
    overlap: bool = True            # decode the next chunk / group while the GPU works
    hw_decode: bool = False         # decode on the GPU's NVDEC where it takes the file (PyAV, CUDA)
    cache_dir: str | None = None    # on-disk vision-feature cache (safetensors); None: memory only
    frame_stash_bytes: int = 2 ** 30    # Lite: decoded frames of later groups taken on the way (0: off)
    prefix_host_bytes: int | str = "auto"   # group-prefix keys/values kept in CPU memory when the
                                    # GPU is full (auto: min(16 GB, RAM / 4) on CUDA, 0 on the CPU)
    prefix_host_format: str = "fp8"  # ... as float8 with per-token scales (half the bytes) or "exact"
    prefix_cpu_bytes: int | None = None  # ... kept for later questions with the model on the CPU
                                         # (None: PrefixKVCache's 2 GiB; 0: none, same results)
    prefix_keep: bool = True        # False: no prefix keys/values kept anywhere (one question per
                                    # process; same results, less memory on the GPU)
    video_backend: str = "auto"     # video decoder: auto (decord, else PyAV), decord or pyav


@dataclass
class Result:
    """The answer and everything needed to see why."""
    answer: str
    method: str
    option_probs: dict[str, float] | None
    groups: list[GroupReport]
    skipped_groups: list[int]
    kept_tokens: list[dict]
    seconds: dict[str, float]
    num_frames: int
    num_slices: int
    tokens_per_slice: int
    budget: int
    redundant_dropped: int = 0
    group_passes: int = 0
    decoded_frames: int = 0
    encoded_slices: int = 0
    extra: dict = field(default_factory=dict)
    group_size: int | None = None            # slices per group as run (clamped to the video)
    requested_group_size: int | None = None  # as asked
    evidence: list[dict] = field(default_factory=list)  # key moments, best first (evidence.py)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def answer(selection: Selection, max_new_tokens: int = 64, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
           hooks: Hooks = NO_HOOKS) -> Result:
    """One pass over the kept tokens in temporal order at their original full-video positions."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1")
    f = selection.features
    adapter = f.adapter
    hooks = hooks or NO_HOOKS
    hooks.check()
    settings = {"budget": selection.budget, "num_frames": f.video.num_frames,
                "max_pixels": f.video.plan.max_pixels}
    with out_of_memory(f.free_memory, settings, adapter.device):
        embeds, coords = f.tokens(selection.gids, hooks)
        t0 = time.perf_counter()
        gen = adapter.generate(selection.prompt, embeds, coords, f.extent_of(None),
                               max_new_tokens=max_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_p=top_p, seed=seed, hooks=hooks)
        del embeds, coords
    f.timer.add("answer", time.perf_counter() - t0, sync=adapter.device)
    probs = None
    q = selection.question
    if q.is_multiple_choice and gen.step_logits:
        _, _, p = response_entropy(gen.step_logits[0], selection.prompt.option_token_ids)
        probs = {L: round(float(x), 6) for L, x in zip(q.letters, p)}
    seconds = f.timer.snapshot()
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 6)
    seconds = {k: round(v, 6) for k, v in seconds.items()}
    passes = sum(1 for g in selection.groups if g.entropy is not None)
    res = Result(gen.text, selection.method, probs, selection.groups, selection.skipped_groups,
                 selection.kept_tokens(), seconds, f.video.num_frames, f.num_slices,
                 f.tokens_per_slice, selection.budget, selection.redundant_dropped, passes,
                 f.decoded_frames, f.encoded_slices, group_size=selection.group_size,
                 requested_group_size=selection.requested_group_size)
    res.evidence = key_moments(selection)
    stats = getattr(f, "stats", None)
    if stats is not None:
        res.extra["features"] = {**stats, **(f.stash_stats() if hasattr(f, "stash_stats") else {}), "decode_busy_s": round(f.decode_busy_seconds(), 6),
                                 "storage": str(f.storage_device)}
    return res


def select(model: Model, video, question: Question, config: AdaptTokenConfig, method: str,
           hooks: Hooks = NO_HOOKS) -> Selection:
    """The selection step of each method, on an opened video. Out of device memory: the model's
    video caches are freed and errors.OutOfMemory says what to lower."""
    if method not in METHODS:
        raise InputError(f"method={method!r} is not known: use one of {', '.join(METHODS)}")
    settings = {"num_frames": video.num_frames, "budget": config.budget,
                "max_pixels": config.max_pixels,
                "group_size": None if method == "uniform" else config.group_size}
    with out_of_memory(model.clear_cache, settings, model.adapter.device):
        return _select(model, video, question, config, method, hooks)


def _scored(model: Model, video, question: Question, config: AdaptTokenConfig, method: str):
    """The lazy group scores of a grouped method (with Lite's stop rule for 'lite')."""
    groups = split_groups(video, config.group_size, config.layout)
    ranked = RankedGroups(model, groups, question, config.layer, config.aggregation)
    scored = score_groups(ranked, config.entropy_mode, config.entropy_tokens)
    if method == "lite":
        scored = early_stop(scored, config.stop_threshold, config.min_groups, config.stop_confirm,
                            config.stop_check_answer)
    return scored


def _allocation_args(config: AdaptTokenConfig, method: str) -> dict:
    if method == "even_split":      # FlexSelect: B / G per group, no entropy, no redundancy removal
        return {"relevance_mode": "even", "redundancy_threshold": None, "method": "even_split"}
    return {"relevance_mode": config.relevance, "tau": config.tau, "floor": config.floor,
            "redundancy_threshold": config.redundancy_threshold}


def _select(model: Model, video, question: Question, config: AdaptTokenConfig, method: str,
            hooks: Hooks) -> Selection:
    if method == "uniform":
        return uniform_frames(model, video, question, config.budget)
    scored = _scored(model, video, question, config, method)
    if method == "even_split":
        return even_split(scored, config.budget, hooks=hooks)
    return allocate(scored, config.budget, **_allocation_args(config, method), hooks=hooks)


def ask_parallel(model: Model, video, question: Question, config: AdaptTokenConfig, method: str,
                 layout, hooks: Hooks = NO_HOOKS) -> Result | None:
    """One question over every rank of a torchrun job (distributed.py), on an opened video: the
    groups divided among the replicas, allocation and the answer on replica 0. Returns the Result
    on replica 0 (every rank of it), None on the other replicas."""
    from . import distributed
    if method not in METHODS:
        raise InputError(f"method={method!r} is not known: use one of {', '.join(METHODS)}")
    if method == "uniform":          # no group passes to divide: replica 0 alone
        if layout.replica != 0:
            return None
        sel = select(model, video, question, config, method, hooks)
        return answer(sel, config.max_new_tokens, config.do_sample, config.temperature,
                      config.top_p, config.seed, hooks)
    settings = {"num_frames": video.num_frames, "budget": config.budget,
                "max_pixels": config.max_pixels, "group_size": config.group_size}
    scored = _scored(model, video, question, config, method)
    with out_of_memory(model.clear_cache, settings, model.adapter.device):
        with distributed.ParallelQuestion(layout, scored) as pq:
            sel = pq.select(config.budget, **_allocation_args(config, method), hooks=hooks)
            if sel is None:
                return None
            res = answer(sel, config.max_new_tokens, config.do_sample, config.temperature,
                         config.top_p, config.seed, hooks)
    rep = pq.report()
    res.extra["distributed"] = rep
    res.decoded_frames, res.encoded_slices, _ = distributed.totals(rep)
    return res


def prepare(model: Model, video_path, config: AdaptTokenConfig, fresh_features: bool = False):
    """Open `video_path` with the config's sampling and set up its features store (cache, decoding,
    stash, prefix keys/values) for one question; the probe's seconds go to the store's timer.
    -> the VideoHandle that select() takes."""
    t0 = time.perf_counter()
    video = open_video(video_path, num_frames=config.num_frames, max_fps=config.max_fps,
                       start=config.start, end=config.end, max_pixels=config.max_pixels,
                       min_pixels=config.min_pixels,
                       frames_per_slice=model.adapter.frames_per_slice,
                       backend=config.video_backend)
    probe_s = time.perf_counter() - t0
    if fresh_features:
        model.clear_cache()
    feats = model.features_for(video)
    feats.configure(feature_device=config.feature_device, decode_workers=config.decode_workers,
                    overlap=config.overlap, cache_dir=config.cache_dir,
                    frame_stash_bytes=config.frame_stash_bytes,
                    prefix_host_bytes=config.prefix_host_bytes,
                    prefix_host_format=config.prefix_host_format,
                    prefix_cpu_bytes=config.prefix_cpu_bytes, prefix_keep=config.prefix_keep,
                    hw_decode=bool(config.hw_decode))
    feats.reset_stats()
    feats.timer.add("probe", probe_s)
    return video


def ask(model: Model, video_path, question: str | Question, options=(),
        config: AdaptTokenConfig | None = None, method: str = "adapttoken",
        hooks: Hooks = NO_HOOKS, fresh_features: bool = False, layout=None) -> Result | None:
    """Answer a question about a video file with AdaptToken ('adapttoken'), AdaptToken-Lite
    ('lite') or a baseline at the same token budget ('uniform', 'even_split').
    layout: a distributed.Layout inside a torchrun job (the work divided among its ranks; the
    Result on replica 0, None on the others); None: this process alone."""
    config = config or AdaptTokenConfig()
    q = question if isinstance(question, Question) else Question(question, tuple(options))
    check_budget(config.budget)
    video = prepare(model, video_path, config, fresh_features)
    if layout is not None:
        return ask_parallel(model, video, q, config, method, layout, hooks)
    sel = select(model, video, q, config, method, hooks)
    return answer(sel, config.max_new_tokens, config.do_sample, config.temperature, config.top_p,
                  config.seed, hooks)


def _sync(dev) -> None:
    if isinstance(dev, torch.device) and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def read_questions(path) -> list[Question]:
    """Questions from a JSONL file: one object a line with `question`, optional `options` (a list)
    and optional `id` (default: the line number). Blank lines are skipped."""
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--questions {str(p)!r} is not a file: give a JSONL file, one "
                         f"{{\"question\": ..., \"options\": [...], \"id\": ...}} per line")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p.name} line {n} is not JSON ({e.msg}): one object per line") from None
        if not isinstance(d, dict) or not isinstance(d.get("question"), str) or not d["question"].strip():
            raise InputError(f"{p.name} line {n} has no \"question\" text: "
                             f"{{\"question\": \"...\", \"options\": [...]}}")
        opts = d.get("options") or []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise InputError(f"{p.name} line {n}: \"options\" must be a list of strings")
        out.append((str(d.get("id", n)), Question(d["question"], tuple(opts))))
    if not out:
        raise InputError(f"{p.name} holds no questions")
    return out


def ask_many(model: Model, video_path, questions, config: AdaptTokenConfig | None = None,
             method: str = "adapttoken", hooks: Hooks = NO_HOOKS) -> list[Result]:
    """Several questions on one video: the first decodes and encodes what it needs; the others reuse
    the model's features of the video and the groups' prefix keys/values (question-independent),
    so they pay mostly the question suffixes and the answer. `questions`: Question objects or
    strings. Results in order; each has its own seconds."""
    config = config or AdaptTokenConfig()
    return [ask(model, video_path, q, config=config, method=method, hooks=hooks) for q in questions]
