"""Speed benchmark of the whole product on a full-size architecture with random weights:
Qwen2.5-VL-7B (default), Qwen3-VL-8B or InternVL3-8B (`--arch`, configs in bench/archs.py).

    python -m adapttoken bench gpu --frames 1024 4096 10000 --out docs/bench_gpu
    python -m adapttoken bench gpu --arch qwen3-vl-8b --frames 1024 4096   # -> docs/bench_gpu_qwen3_vl_8b
    python -m adapttoken bench gpu --tiny --frames 64 128 --out /tmp/bench_tiny     # CPU smoke test

Builds Qwen2.5-VL-7B (text: hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064,
M-RoPE [16,24,24]; vision: depth 32, hidden 1280, 16 heads, MLP 3420, window 112, full attention at
blocks 7/15/23/31) with random bf16 weights directly on the GPU; compute does not depend on the
weight values. Runs the library's own pipeline (open_video -> split_groups -> RankedGroups ->
score_groups [-> stop rule] -> allocate -> answer, exactly what `ask` runs) on a real video file
decoded from local disk, per sampled length:

- uniform: as many evenly spaced slices as fit the budget, no group pass;
- adapttoken: every group;
- lite: groups in order, stopped after `--lite-stop-fraction` of them. Random weights give no
  confident group, so Lite's stop point is a benchmark parameter: the stop rule here stops after
  exactly k = round(fraction * groups) groups whatever the entropies (StopRule(threshold=1.0,
  min_groups=k) would do the same whenever the entropy is below its maximum);
- second question: a new question on the same video and sampling, right after adapttoken, with the
  vision features still in memory (no decoding, no vision tower).

Per case: seconds per stage (probe, decode = time the pipeline waited for frames, preprocess,
vision, group_pass, allocate, answer), wall time, counted FLOPs per stage and TFLOP/s, tokens per
second, peak GPU memory (torch.cuda.max_memory_allocated, reset per case). The compute floor of a
case is its counted FLOPs over the bf16 matmul rate measured in the same run (8192^3).

FLOPs (multiply-add = 2): vision tower = qwen_vision_fast.count_flops per slice (matmuls, window and
full attention, merger) for Qwen2.5-VL, archs.vision_flops_per_slice for Qwen3-VL (patch embed,
27 blocks of full attention within the slice, merger + 3 deepstack mergers) and InternVL (patch
embed, 24 layers over 1025 tokens, pixel-shuffle projector), times the slices encoded; every
language-model call is counted from its real shapes (a hook on the text model): 2 * decoder-linear
params * new tokens + attention 4 * layers * heads * head_dim * (new * past + new * (new + 1) / 2)
(causal) + the LM head on the positions that get logits (1 per call); the attention probe (q/k
projections and the score matrix) per group. The other families have no prefix key/value cache:
their second question re-runs every group pass (vision features reused).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

STAGES = ("probe", "cache_load", "decode", "preprocess", "vision", "group_pass", "allocate", "answer")
METHODS = ("uniform", "adapttoken", "second_question", "lite")

SEVEN_B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
SEVEN_B_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                      out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None)
TINY_VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                   window_size=112, fullatt_block_indexes=[1])

Q1 = ("What colour was the object that appeared in the video?", ("red", "green", "blue", "yellow"))
Q2 = ("Which appeared first in the video, the red object or the blue object?",
      ("the red object", "the blue object", "both at once", "neither appeared"))


# ----------------------------------------------------------------------------------------------
# model


def build_config(tok, text: dict, vision: dict, attn: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    from ..tiny import SPECIAL_TOKENS
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    q = head_dim // 2
    section = [q - 2 * (3 * q // 8), 3 * q // 8, 3 * q // 8]       # [16, 24, 24] at head_dim 128
    vocab = text["vocab_size"] or len(tok)
    if vocab < len(tok):
        raise ValueError(f"vocab {vocab} smaller than the tokenizer's {len(tok)} tokens")
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=text["hidden_size"],
                         intermediate_size=text["intermediate_size"],
                         num_hidden_layers=text["num_hidden_layers"],
                         num_attention_heads=text["num_attention_heads"],
                         num_key_value_heads=text["num_key_value_heads"],
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": section},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision["depth"], hidden_size=vision["hidden_size"],
                           intermediate_size=vision["intermediate_size"],
                           num_heads=vision["num_heads"], out_hidden_size=vision["out_hidden_size"],
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                           window_size=vision["window_size"],
                           fullatt_block_indexes=list(vision["fullatt_block_indexes"]),
                           tokens_per_second=2, hidden_act="silu"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        attn_implementation=attn, tie_word_embeddings=False,
    )


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, pixels: int, seed: int = 0):
    """(Model, build seconds): random weights created directly on `device` in `dtype`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..models.base import Model
    from ..models.qwen2_5_vl import Qwen25VLAdapter
    from ..tiny import build_processor, build_tokenizer

    t0 = time.perf_counter()
    tok = build_tokenizer()
    proc = build_processor(tok, min_pixels=pixels, max_pixels=pixels)
    cfg = build_config(tok, TINY_TEXT if tiny else SEVEN_B_TEXT, TINY_VISION if tiny else SEVEN_B_VISION)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    adapter = Qwen25VLAdapter(model, proc)
    _sync(device)
    return Model(adapter, name="qwen2.5-vl-7b-random" if not tiny else "tiny-random"), \
        time.perf_counter() - t0


ARCH_NAMES = ("qwen2.5-vl-7b", "qwen3-vl-8b", "internvl3-8b")
ARCH_LABELS = {"qwen2.5-vl-7b": "Qwen2.5-VL-7B", "qwen3-vl-8b": "Qwen3-VL-8B",
               "internvl3-8b": "InternVL3-8B"}


def default_out(arch: str) -> str:
    """docs/bench_gpu for Qwen2.5-VL-7B, docs/bench_gpu_<arch> (dots and dashes as _) otherwise."""
    if arch == "qwen2.5-vl-7b":
        return "docs/bench_gpu"
    return "docs/bench_gpu_" + arch.replace("-", "_").replace(".", "_")


def _vision_modules(m) -> list:
    """The vision tower and its merger / projector of a transformers VLM (all supported families)."""
    inner = m.model
    mods = [getattr(inner, n) for n in ("visual", "vision_tower", "multi_modal_projector")
            if getattr(inner, n, None) is not None]
    return mods


def param_counts(model) -> dict:
    m = model.adapter.model
    vis = sum(p.numel() for mod in _vision_modules(m) for p in mod.parameters())
    lm = m.model.language_model
    dec_linear = sum(mod.weight.numel() for layer in lm.layers for mod in layer.modules()
                     if isinstance(mod, torch.nn.Linear))
    emb = m.get_input_embeddings().weight.numel()
    head = m.lm_head.weight.numel()
    total = sum(p.numel() for p in m.parameters())
    return {"vision": vis, "decoder_linear": dec_linear, "embedding": emb, "lm_head": head,
            "total": total, "bytes": sum(p.numel() * p.element_size() for p in m.parameters())}


# ----------------------------------------------------------------------------------------------
# FLOP accounting


class LLMCounter:
    """Counts FLOPs of every language-model call from its real shapes (a pre-hook on the text model)."""

    def __init__(self, model):
        a = model.adapter
        self.adapter = a
        self.phase = "group_pass"
        self.text = a.text_model
        cfg = a.model.config.text_config
        self.layers = cfg.num_hidden_layers
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.vocab = cfg.vocab_size
        self.dec_linear = param_counts(model)["decoder_linear"]
        self.calls: list[tuple[int, int, bool]] = []      # (new tokens, past tokens, in answer)
        self._h = None

    def __enter__(self):
        from ..models.compat import passed_cache

        def hook(module, args, kwargs):
            x = kwargs.get("inputs_embeds")
            if x is None:
                x = kwargs.get("input_ids")
            if x is None:
                x = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
            n = int(x.shape[1]) if x is not None else 0
            past = passed_cache(kwargs)
            p = int(past.get_seq_length()) if past is not None else 0
            self.calls.append((n, p, self.phase == "answer"))
        self._h = self.text.register_forward_pre_hook(hook, with_kwargs=True)
        a = self.adapter
        self._orig = (a.forward, a.generate)

        def phased(fn, phase):
            def run(*args, **kw):
                prev, self.phase = self.phase, phase
                try:
                    return fn(*args, **kw)
                finally:
                    self.phase = prev
            return run
        a.forward, a.generate = phased(a.forward, "group_pass"), phased(a.generate, "answer")
        return self

    def __exit__(self, *exc):
        self._h.remove()
        self.adapter.forward, self.adapter.generate = self._orig

    def reset(self):
        self.calls = []

    def call_flops(self, n: int, past: int) -> float:
        mm = 2.0 * self.dec_linear * n + 2.0 * self.vocab * self.hidden      # + LM head, 1 position
        attn = 4.0 * self.layers * self.heads * self.head_dim * (n * past + n * (n + 1) / 2)
        return mm + attn

    def probe_flops(self, n: int, past: int, n_query: int) -> float:
        """q projection of the query rows, k projection of every row (not when the keys come from
        the prefix cache), scores and softmax-weighted nothing (scores only)."""
        kvd = self.kv * self.head_dim
        k_proj = 2.0 * n * self.hidden * kvd if past == 0 else 0.0
        return (2.0 * n_query * self.hidden * self.heads * self.head_dim + k_proj
                + 2.0 * self.heads * n_query * (n + past) * self.head_dim)

    def split(self, n_suffix: int) -> dict:
        """FLOPs and token counts of the group passes and of the answer (prefill + new tokens)."""
        gp = [(n, p) for n, p, c in self.calls if not c]
        ans = [(n, p) for n, p, c in self.calls if c]
        out = {
            "group_pass_calls": len(gp),
            "group_pass_tokens": sum(n for n, _ in gp),
            "group_pass": sum(self.call_flops(n, p) + self.probe_flops(n, p, max(1, n_suffix - 1))
                              for n, p in gp),
            "group_pass_cached_calls": sum(1 for _, p in gp if p > 0),
            "answer_calls": len(ans),
            "answer_prefill_tokens": ans[0][0] if ans else 0,
            "answer_new_tokens": max(0, len(ans) - 1) + (1 if ans else 0),
            "answer": sum(self.call_flops(n, p) for n, p in ans),
        }
        return out


def vision_flops_per_slice(model, resized) -> float:
    from ..models.qwen_vision_fast import count_flops
    cfg = model.adapter.model.config
    if cfg.model_type != "qwen2_5_vl":
        from .archs import vision_flops_per_slice as other
        return other(cfg, resized)
    vcfg = cfg.vision_config
    p = vcfg.patch_size
    grid = torch.tensor([[1, resized[0] // p, resized[1] // p]])
    return float(count_flops(vcfg, grid)["total"])


# ----------------------------------------------------------------------------------------------
# device measurements


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, n: int = 8192, iters: int = 20, dtype=torch.bfloat16) -> dict:
    """bf16 n^3 matmul rate (median of 3 timings of `iters` products, with events)."""
    if torch.device(device).type != "cuda":
        n, iters = min(n, 512), 3
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(3):
        c = a @ b
    _sync(device)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        _sync(device)
        rates.append(2.0 * n ** 3 * iters / (time.perf_counter() - t0))
    del a, b, c
    return {"n": n, "dtype": str(dtype), "flops_per_s": statistics.median(rates),
            "runs": rates}


def copy_bandwidth(device, nbytes: int = 2 * 2 ** 30) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    _sync(device)
    bw = 2.0 * nbytes * 5 / (time.perf_counter() - t0)
    del x, y
    return bw


# ----------------------------------------------------------------------------------------------
# test video


def make_video(path: Path, frames: int, size: tuple[int, int], fps: float = 8.0, gop: int = 64,
               crf: int = 18, clip: int = 48, seed: int = 0) -> dict:
    """A real H.264 file of `frames` frames: a rendered synthetic clip (adapttoken.synthetic.Scene)
    looped with a drift of 4 px per loop and a binary frame counter stamped in, so no two frames
    are equal. Decoding it is real work; rendering 10,000 distinct scenes would cost minutes."""
    from ..synthetic import Scene, write_video

    t0 = time.perf_counter()
    H, W = size
    base = Scene(clip, seed, size).render(0, clip)            # [clip, H, W, 3]
    bits = 14

    def frames_iter():
        chunk = []
        for t in range(frames):
            f = np.roll(base[t % clip], 4 * (t // clip), axis=1)
            code = (t >> np.arange(bits)) & 1
            f = f.copy()
            for i, bit in enumerate(code):
                f[2:10, 2 + 8 * i:8 + 8 * i] = 255 if bit else 0
            chunk.append(f)
            if len(chunk) == 64:
                yield np.stack(chunk)
                chunk = []
        if chunk:
            yield np.stack(chunk)

    write_video(path, frames_iter(), fps, crf=crf, gop=gop)
    return {"path": str(path), "frames": frames, "height": H, "width": W, "fps": fps, "gop": gop,
            "crf": crf, "codec": "h264 (libx264)", "bytes": path.stat().st_size,
            "seconds_to_make": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# one case


@dataclass
class Case:
    frames: int
    method: str
    seconds: dict = field(default_factory=dict)
    wall: float = 0.0
    flops: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    peak_gib: float = 0.0
    groups: int = 0
    group_passes: int = 0
    decoded_frames: int = 0
    encoded_slices: int = 0
    kept: int = 0
    features: dict = field(default_factory=dict)
    note: str = ""


class StopAfter:
    """Lite's stop rule for the benchmark: stop after exactly k groups (random weights are never
    confident, so the stop point is a parameter)."""

    def __init__(self, k: int):
        self.k = int(k)
        self.threshold, self.min_groups = 1.0, self.k

    def should_stop(self, processed) -> bool:
        return len(processed) >= self.k


def run_case(model, video_path, frames: int, method: str, args, counter: LLMCounter,
             vis_per_slice: float, question=Q1, fresh: bool = True, cache_dir=None) -> Case:
    """One question through the library pipeline (what `ask` does), timed and counted."""
    from ..budget import allocate, uniform_frames
    from ..entropy import score_groups
    from ..features import open_video
    from ..groups import split_groups
    from ..models.base import Question
    from ..pipeline import answer
    from ..rank import RankedGroups

    dev = model.adapter.device
    q = Question(question[0], tuple(question[1]))
    if fresh:
        model.clear_cache()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    counter.reset()
    _sync(dev)
    t_start = time.perf_counter()
    video = open_video(video_path, num_frames=frames, max_pixels=args.pixels, min_pixels=args.pixels,
                       frames_per_slice=model.adapter.frames_per_slice)
    probe_s = time.perf_counter() - t_start
    feats = model.features_for(video)
    feats.configure(feature_device=args.feature_device, decode_workers=args.decode_workers,
                    overlap=not args.no_overlap, cache_dir=cache_dir,
                    pad_chunks=bool(args.compile_vision),
                    prefix_host_bytes=int(args.kv_host_gib * 2 ** 30))
    feats.reset_stats()
    feats.timer.add("probe", probe_s)
    n_groups = 0
    if method == "uniform":
        sel = uniform_frames(model, video, q, args.budget)
    else:
        groups = split_groups(video, args.group_size, "strided")
        n_groups = len(groups)
        ranked = RankedGroups(model, groups, q)
        scored = score_groups(ranked)
        if method == "lite":
            k = max(1, round(args.lite_stop_fraction * n_groups))
            scored = scored.with_stop(StopAfter(k))
        sel = allocate(scored, args.budget, redundancy_threshold=0.9, method=method)
    res = answer(sel, max_new_tokens=args.max_new_tokens)
    _sync(dev)
    wall = time.perf_counter() - t_start

    c = Case(frames, method, wall=wall)
    c.seconds = {k: v for k, v in res.seconds.items() if k != "total"}
    c.seconds["sum_of_stages"] = res.seconds.get("total", 0.0)
    n_suffix = len(sel.prompt.suffix_ids)
    llm = counter.split(n_suffix)
    c.flops = {"vision": vis_per_slice * res.encoded_slices, "group_pass": llm["group_pass"],
               "answer": llm["answer"]}
    c.flops["total"] = sum(c.flops.values())
    c.tokens = {k: v for k, v in llm.items() if k not in ("group_pass", "answer")}
    c.tokens["vision_tokens"] = res.encoded_slices * feats.tokens_per_slice
    if dev.type == "cuda":
        c.peak_gib = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    c.groups, c.group_passes = n_groups, res.group_passes
    c.decoded_frames, c.encoded_slices = res.decoded_frames, res.encoded_slices
    c.kept = len(res.kept_tokens)
    c.features = dict(res.extra.get("features", {}))
    kv = getattr(feats, "prefix_kv", None)
    if kv is not None:
        c.features.update(prefix_kv_hits=kv.hits, prefix_kv_stored=kv.stored,
                          prefix_kv_refused=kv.refused, prefix_kv_gib=kv.bytes / 2 ** 30,
                          prefix_kv_host_stored=kv.host_stored,
                          prefix_kv_host_gib=kv.host_used / 2 ** 30,
                          prefix_kv_host_s=round(kv.host_seconds, 4))
    if dev.type == "cuda":
        from ..features import device_memory_budget
        c.features["device_budget_gib"] = device_memory_budget(dev) / 2 ** 30
    return c


# ----------------------------------------------------------------------------------------------
# report


def derived(c: dict, rate: float) -> dict:
    s, f = c["seconds"], c["flops"]
    out = {"floor_s": f["total"] / rate if rate else None}
    out["x_floor"] = c["wall"] / out["floor_s"] if out["floor_s"] else None
    out["tflops_e2e"] = f["total"] / c["wall"] / 1e12 if c["wall"] else 0.0
    for k in ("vision", "group_pass", "answer"):
        t = s.get(k, 0.0)
        out[f"tflops_{k}"] = f[k] / t / 1e12 if t > 0 and f[k] > 0 else None
    out["frames_per_s"] = c["frames"] / c["wall"] if c["wall"] else 0.0
    llm_t = s.get("group_pass", 0.0) + s.get("answer", 0.0)
    llm_tok = c["tokens"].get("group_pass_tokens", 0) + c["tokens"].get("answer_prefill_tokens", 0)
    out["llm_tokens_per_s"] = llm_tok / llm_t if llm_t > 0 else None
    vt = s.get("vision", 0.0) + s.get("preprocess", 0.0)
    out["vision_tokens_per_s"] = c["tokens"]["vision_tokens"] / vt if vt > 0 else None
    return out


def text_path(meta: dict) -> str:
    if "fuse_text" not in meta:
        return "transformers' eager RMSNorm/MLP (runs before fused_text.py)"
    if meta["fuse_text"] is False:
        return "transformers' eager RMSNorm/MLP (--no-fuse-text)"
    return "fused RMSNorm / SiLU-MLP / rotary kernels, torch.compile (the library's default on CUDA)"


def vision_path(meta: dict) -> str:
    if meta.get("arch", "qwen2.5-vl-7b") != "qwen2.5-vl-7b":
        return "transformers' own tower (sdpa)"
    cv = meta.get("compile_vision")
    if "fuse_text" not in meta and not cv:
        # runs before the tri-state flag: False meant "not forced", i.e. qwen_vision_fast's
        # default, which compiles on CUDA (the report then called it "eager")
        return "fast batched, torch.compile on CUDA (the library's default; reported as eager then)"
    if cv is True:
        return "fast batched + torch.compile (forced, chunks padded to one shape)"
    if cv is False:
        return "fast batched, eager (compile off)"
    return "fast batched, torch.compile on CUDA (the library's default)"


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(results: dict) -> str:
    meta, rate = results["meta"], results["matmul"]["flops_per_s"]
    arch = meta.get("arch", "qwen2.5-vl-7b")
    fps_slice = meta.get("frames_per_slice", 2)
    lines = [f"# `bench gpu`: {ARCH_LABELS.get(arch, arch)} architecture, random bf16 weights, end to end", "",
             f"- device: {meta.get('gpu', meta['device'])}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, PyAV {meta.get('av')}, Python {meta['python']}, "
             f"{meta['cpu_count']} CPU cores",
             f"- bf16 {results['matmul']['n']}^3 matmul in this run: {rate / 1e12:.0f} TFLOP/s"
             + (f"; device copy {results['copy_bw'] / 1e9:.0f} GB/s" if results.get("copy_bw") else ""),
             f"- video: {meta['video']['frames']} frames of {meta['video']['height']}x"
             f"{meta['video']['width']} H.264 (GOP {meta['video'].get('gop')}) decoded from local "
             f"disk with PyAV; "
             + (f"{meta['pixels']} pixels per frame" if arch != "internvl3-8b"
                else "each frame squashed to 448x448")
             + f" = {meta['tokens_per_slice']} tokens per {fps_slice}-frame slice",
             f"- budget {meta['budget']} tokens, groups of {meta['group_size']} slices (strided), "
             f"answer: {meta['max_new_tokens']} new tokens; vision path: {vision_path(meta)}; "
             + (f"language model: {text_path(meta)}; " if arch == "qwen2.5-vl-7b" else "")
             + f"features kept: {meta['feature_device']}; decoder threads: {meta['decode_workers']}",
             f"- Lite: random weights give no confident group, so the stop point is a benchmark "
             f"parameter: Lite stops after round({meta['lite_stop_fraction']} x groups) groups.",
             f"- second question: a new question on the same video and sampling right after "
             f"adapttoken; its vision features are still in memory"
             + (", and so are the keys/values of each group's prefix (system prompt + visual "
                "tokens) where they fit (PrefixKVCache)." if arch == "qwen2.5-vl-7b" else
                "; this family has no prefix key/value cache, so every group pass runs again."),
             (f"- lengths >= {meta['card_from']} frames run as on a {meta['card_gib']:g} GiB card: "
              f"torch.cuda.set_per_process_memory_fraction caps the allocator there (allocations "
              f"beyond it fail) and the library sizes its GPU caches to it." if meta.get("card_gib")
              else "- no memory cap."),
             (f"- report rebuilt from the runs below with: `{meta['command']}`" if results.get("runs")
              else f"- rerun: `{meta['command']}`")]
    for i, r in enumerate(results.get("runs", []), 1):
        lines.append(f"- run {i}: `{r['command']}` ({r.get('gpu')}, matmul "
                     f"{r['matmul_tflops']:.0f} TFLOP/s){': ' + r['note'] if r.get('note') else ''}")
    lines += ["",
             "Seconds per stage (decode = time the pipeline waited for frames; the decoder threads "
             "run alongside the GPU), wall time, compute floor (counted FLOPs / measured matmul "
             "rate), achieved TFLOP/s, peak GPU memory.", ""]
    hdr = ("| frames | method | groups run | decode | preproc | vision | group pass | allocate | "
           "answer | wall s | floor s | x floor | TFLOP/s e2e | vision TFLOP/s | group TFLOP/s | "
           "frames/s | LLM tok/s | peak GiB | run |")
    lines += [hdr, "|" + "|".join(["---"] * 19) + "|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for c in sorted(results["cases"], key=lambda c: (c["frames"], order.get(c["method"], 9))):
        s, d = c["seconds"], c["derived"]
        runs = f"{c['group_passes']}/{c['groups']}" if c["groups"] else "-"
        lines.append("| " + " | ".join([
            str(c["frames"]), c["method"], runs, _fmt(s.get("decode", 0.0)),
            _fmt(s.get("preprocess", 0.0)), _fmt(s.get("vision", 0.0)),
            _fmt(s.get("group_pass", 0.0)), _fmt(s.get("allocate", 0.0)), _fmt(s.get("answer", 0.0)),
            _fmt(c["wall"]), _fmt(d["floor_s"]), _fmt(d["x_floor"]), _fmt(d["tflops_e2e"], 0),
            _fmt(d["tflops_vision"], 0), _fmt(d["tflops_group_pass"], 0), _fmt(d["frames_per_s"], 0),
            _fmt(d["llm_tokens_per_s"], 0), _fmt(c["peak_gib"], 1), str(c.get("run", 1))]) + " |")
    lines += ["", "## Targets" + ("" if arch == "qwen2.5-vl-7b" else
                                  " (set for Qwen2.5-VL-7B in issue #5; shown here for comparison)"), ""]
    for t in results.get("targets", []):
        lines.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['what']}: {t['measured']}")
    if results.get("disk_cache"):
        dc = results["disk_cache"]
        lines += ["", "## On-disk feature cache" + (f" (run {dc['run']})" if dc.get("run") else ""), "",
                  f"- {dc['frames']} frames: first run (computes and writes) {dc['first_wall']:.2f} s; "
                  f"new in-memory cache, same cache folder: {dc['second_wall']:.2f} s "
                  f"(decoded {dc['second_decoded']} frames, loaded {dc['second_loaded']} slices in "
                  f"{dc['second_cache_load_s']:.2f} s); cache size {dc['bytes'] / 2 ** 30:.2f} GiB"]
    if results.get("variants"):
        lines += ["", "## One optimisation undone at a time (full method)", "",
                  "| variant | frames | run | decode | preproc | vision | group pass | allocate | answer "
                  "| wall s | x floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [(v["variant"], v) for v in results["variants"]]
        if not any(v.get("reference") for v in results["variants"]):
            L = results["variants"][0]["frames"]
            ref = next((c for c in results["cases"] if c["frames"] == L
                        and c["method"] == "adapttoken"), None)
            rows = ([("as benchmarked above", ref)] if ref else []) + rows
        for name, c in rows:
            s = c["seconds"]
            lines.append("| " + " | ".join([name, str(c["frames"]), str(c.get("run", 1))]
                         + [_fmt(s.get(k, 0.0)) for k in
                            ("decode", "preprocess", "vision", "group_pass", "allocate", "answer")]
                         + [_fmt(c["wall"]), _fmt(c["derived"]["x_floor"])]) + " |")
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(results["errors"])]
    lines += ["", "## Rerun", "",
              "On a CUDA machine with PyAV (the video is generated, then decoded for real):", "",
              ("    python -m adapttoken bench gpu --frames 4096 10000 1024 --out docs/bench_gpu "
               "--disk-cache --variants" if arch == "qwen2.5-vl-7b" else
               f"    python -m adapttoken bench gpu --arch {arch} --frames 1024 4096"), "",
              "`--eager-vision` / `--compile-vision` force the Qwen2.5-VL tower eager / compiled (the "
              "default compiles it on CUDA), `--card-gib 0` lifts the "
              "24 GiB cap of the 10,000-frame cases, `--tiny --device cpu` runs a smoke test. "
              "`--from-json A.json B.json` rebuilds this page from saved runs.",
              "", "Columns: decode = seconds the pipeline waited for frames (the decoder lanes work "
              "alongside the GPU); preproc/vision/group pass/answer include the GPU work they "
              "launched; floor = counted FLOPs / the bf16 matmul rate of the same run; frames/s = "
              "sampled frames / wall; LLM tok/s = tokens through the language model (group passes + "
              "answer prefill) / their seconds; peak = torch.cuda.max_memory_allocated, reset per case."]
    if results.get("skipped"):
        lines += ["", "Not run (time limit): " + ", ".join(results["skipped"])]
    lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Stacked bars of seconds per stage, per length and method, with the compute floor marked."""
    from PIL import Image, ImageDraw

    cases = results["cases"]
    if not cases:
        return
    colours = {"probe": (200, 200, 200), "cache_load": (150, 150, 150), "decode": (230, 159, 0),
               "preprocess": (240, 228, 66), "vision": (0, 114, 178), "group_pass": (0, 158, 115),
               "allocate": (204, 121, 167), "answer": (213, 94, 0), "other": (90, 90, 90)}
    W, H, left, bottom, top = 1200, 560, 70, 120, 40
    bar, gap = 34, 12
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lengths = sorted({c["frames"] for c in cases})
    n_slots = len(cases) + len(lengths)
    bar = max(8, min(bar, (W - left - 20) // max(1, n_slots) - gap))
    # one scale per panel is unreadable across 1k..10k; use log-free linear scale of the max
    vmax = max(max(c["wall"], c["derived"]["floor_s"] or 0) for c in cases) * 1.05
    plot_h = H - bottom - top

    def y(v):
        return H - bottom - int(plot_h * v / vmax)

    d.line([(left, top), (left, H - bottom)], fill="black")
    d.line([(left, H - bottom), (W - 10, H - bottom)], fill="black")
    for i in range(6):
        v = vmax * i / 5
        d.line([(left - 4, y(v)), (left, y(v))], fill="black")
        d.text((5, y(v) - 6), f"{v:.0f} s", fill="black")
    x = left + gap
    for L in lengths:
        for c in [c for c in cases if c["frames"] == L]:
            acc = 0.0
            for st in STAGES:
                v = c["seconds"].get(st, 0.0)
                if v > 0:
                    d.rectangle([x, y(acc + v), x + bar, y(acc)], fill=colours[st])
                    acc += v
            other = max(0.0, c["wall"] - acc)
            if other > 0:
                d.rectangle([x, y(acc + other), x + bar, y(acc)], fill=colours["other"])
            fl = c["derived"]["floor_s"]
            if fl:
                d.line([(x - 3, y(fl)), (x + bar + 3, y(fl))], fill="red", width=2)
            label = {"uniform": "unif", "adapttoken": "full", "second_question": "2nd q",
                     "lite": "lite"}.get(c["method"], c["method"])
            d.text((x, H - bottom + 6), label, fill="black")
            x += bar + gap
        d.text((x - (bar + gap) * 2, H - bottom + 22), f"{L} frames", fill="black")
        x += bar
    lx, ly = left, H - bottom + 50
    for st in (*STAGES, "other"):
        d.rectangle([lx, ly, lx + 12, ly + 12], fill=colours[st])
        d.text((lx + 16, ly), st, fill="black")
        lx += 120
        if lx > W - 120:
            lx, ly = left, ly + 18
    d.line([(lx, ly + 6), (lx + 14, ly + 6)], fill="red", width=2)
    d.text((lx + 18, ly), "compute floor", fill="black")
    arch = results["meta"].get("arch", "qwen2.5-vl-7b")
    d.text((left, 10), f"AdaptToken on {ARCH_LABELS.get(arch, arch)} (random weights), "
                       f"{results['meta'].get('gpu', results['meta']['device'])}: seconds per question",
           fill="black")
    img.save(path)


def targets(results: dict) -> list[dict]:
    out = []
    by = {(c["frames"], c["method"]): c for c in results["cases"]}
    full = by.get((4096, "adapttoken"))
    if full:
        x = full["derived"]["x_floor"]
        out.append({"what": "AdaptToken end to end at 4096 frames within 1.5x the compute floor",
                    "met": x is not None and x <= 1.5,
                    "measured": f"{full['wall']:.2f} s vs floor {full['derived']['floor_s']:.2f} s "
                                f"= {x:.2f}x"})
    for L in sorted({c["frames"] for c in results["cases"]}):
        f, lt = by.get((L, "adapttoken")), by.get((L, "lite"))
        if f and lt and L == 4096:
            r = lt["wall"] / f["wall"]
            out.append({"what": f"Lite stopping after a quarter of the groups <= 0.5x full ({L} frames)",
                        "met": r <= 0.5, "measured": f"{lt['wall']:.2f} s / {f['wall']:.2f} s = {r:.2f}x"})
    peak = [c for c in results["cases"] if c["frames"] == 10000]
    if peak:
        p = max(c["peak_gib"] for c in peak)
        out.append({"what": "peak GPU memory <= 24 GB at 10,000 frames (bf16 weights)",
                    "met": p * 2 ** 30 <= 24e9,
                    "measured": f"{p:.2f} GiB = {p * 2 ** 30 / 1e9:.2f} GB (max over the 10,000-frame cases)"})
    for L in sorted({c["frames"] for c in results["cases"]}):
        f, s2 = by.get((L, "adapttoken")), by.get((L, "second_question"))
        if f and s2:
            r = s2["wall"] / f["wall"]
            out.append({"what": f"second question on the same video <= 0.4x the first ({L} frames)",
                        "met": r <= 0.4, "measured": f"{s2['wall']:.2f} s / {f['wall']:.2f} s = {r:.2f}x"})
    return out


# ----------------------------------------------------------------------------------------------
# main


def merge_results(paths, notes=()) -> dict:
    """Several runs' results.json as one report: a later run's case replaces an earlier run's case
    of the same (frames, method); each case keeps the number of its run and its own run's floor."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {"meta": dict(runs[-1]["meta"]), "matmul": runs[-1]["matmul"],
           "copy_bw": runs[-1].get("copy_bw"), "runs": [], "skipped": [], "cases": []}
    by = {}
    for i, r in enumerate(runs, 1):
        out["runs"].append({"command": r["meta"]["command"], "gpu": r["meta"].get("gpu"),
                            "matmul_tflops": r["matmul"]["flops_per_s"] / 1e12,
                            "note": notes[i - 1] if i - 1 < len(notes) else ""})
        for c in r["cases"]:
            c = dict(c, run=i)
            by[(c["frames"], c["method"])] = c
        if r.get("disk_cache"):
            out["disk_cache"] = dict(r["disk_cache"], run=i)
        if r.get("variants"):
            # every run's variants, each after its own run's reference case at that length
            L = r["variants"][0]["frames"]
            ref = next((c for c in r["cases"] if c["frames"] == L and c["method"] == "adapttoken"), None)
            if ref is not None:
                out.setdefault("variants", []).append(dict(ref, variant="as benchmarked (reference)",
                                                           reference=True, run=i))
            out.setdefault("variants", []).extend(dict(v, run=i) for v in r["variants"])
        out.setdefault("errors", []).extend(r.get("errors", []))
    out["cases"] = list(by.values())
    out["meta"]["command"] = "python -m adapttoken bench gpu --from-json " + " ".join(map(str, paths))
    out["targets"] = targets(out)
    return out


def parse_size(s: str) -> tuple[int, int]:
    h, _, w = s.lower().partition("x")
    return int(h), int(w or h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapttoken bench gpu",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2.5-vl-7b", choices=ARCH_NAMES,
                    help="architecture (random weights); the others come from bench/archs.py")
    ap.add_argument("--frames", type=int, nargs="+", default=[1024, 4096, 10000])
    ap.add_argument("--size", default="308x560", help="frame size HxW (also the pixel cap)")
    ap.add_argument("--budget", type=int, default=7040)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lite-stop-fraction", type=float, default=0.25)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--max-new-tokens", type=int, default=4,
                    help="answer length (random weights never stop by themselves)")
    ap.add_argument("--out", default=None,
                    help="output folder (default: docs/bench_gpu, docs/bench_gpu_<arch> for the others)")
    ap.add_argument("--tiny", action="store_true", help="tiny random config (CPU smoke test)")
    ap.add_argument("--video", default=None, help="video file (default: generate one)")
    ap.add_argument("--video-frames", type=int, default=None,
                    help="frames of the generated video (default: the largest --frames)")
    ap.add_argument("--video-dir", default=None, help="where to write the generated video")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--feature-device", default="auto", choices=["auto", "gpu", "cpu"])
    ap.add_argument("--decode-workers", type=int, default=None)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--compile-vision", action="store_const", const=True, default=None,
                    help="force torch.compile of the fast Qwen2.5-VL tower's blocks (chunks padded to "
                         "one shape); the default already compiles it on CUDA")
    ap.add_argument("--eager-vision", dest="compile_vision", action="store_const", const=False,
                    help="run the fast Qwen2.5-VL tower eagerly (no torch.compile)")
    ap.add_argument("--no-fuse-text", dest="fuse_text", action="store_const", const=False,
                    default=None, help="Qwen2.5-VL: transformers' eager RMSNorm/MLP in the language "
                                       "model instead of the fused kernels (fused_text.py)")
    ap.add_argument("--disk-cache", action="store_true",
                    help="also time the on-disk feature cache (write, then load) at the smallest length")
    ap.add_argument("--card-gib", type=float, default=24.0,
                    help="emulate a card of this many GiB (torch.cuda.set_per_process_memory_fraction: "
                         "allocations beyond it fail) for the lengths >= --card-from; 0: off")
    ap.add_argument("--card-from", type=int, default=10000)
    ap.add_argument("--kv-host-gib", type=float, default=0.0,
                    help="let group-prefix keys/values that do not fit on the GPU live in this many "
                         "GiB of CPU memory (PrefixKVCache host tier; 0: off)")
    ap.add_argument("--variants", nargs="*", default=None,
                    choices=["threads", "hf_vision", "cpu_features", "one_thread", "eager_vision",
                             "compiled_vision", "unfused_text", "repeat"],
                    help="also run the full method at the smallest length with single optimisations "
                         "undone: threads (no decoder threads, no overlap), hf_vision (transformers' "
                         "vision tower), cpu_features, one_thread (one decoder lane), eager_vision "
                         "(compile off); compiled_vision (compile forced, chunks padded); "
                         "unfused_text (transformers' eager RMSNorm/MLP in the language model); "
                         "repeat (the same again: run-to-run spread); no names: the first four")
    ap.add_argument("--variants-frames", type=int, default=None,
                    help="length the variants run at (default: the smallest --frames)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: skip the remaining cases once this much time has passed")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="no benchmark: merge these results.json files (later runs win) and write "
                         "the report (README.md, results.json, bench_gpu.png) to --out")
    ap.add_argument("--note", action="append", default=[],
                    help="with --from-json: a note per run, in order")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = default_out(args.arch)

    if args.from_json:
        res = merge_results(args.from_json, args.note)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "README.md").write_text(markdown(res))
        plot(res, out / "bench_gpu.png")
        print(markdown(res))
        return 0

    t_begin = time.perf_counter()
    device = torch.device(args.device)
    H, W = parse_size(args.size)
    args.pixels = H * W
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import transformers
    try:
        import av
        av_version = av.__version__
    except ImportError:
        av_version = None
    meta = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "av": av_version, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "arch": args.arch, "tiny": args.tiny, "pixels": args.pixels, "budget": args.budget,
            "group_size": args.group_size, "lite_stop_fraction": args.lite_stop_fraction,
            "max_new_tokens": args.max_new_tokens, "compile_vision": args.compile_vision,
            "fuse_text": args.fuse_text,
            "feature_device": args.feature_device, "overlap": not args.no_overlap,
            "card_gib": args.card_gib, "card_from": args.card_from, "kv_host_gib": args.kv_host_gib,
            "command": "python -m adapttoken bench gpu " + " ".join(argv if argv is not None else sys.argv[1:])}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    print(f"[bench gpu] {meta.get('gpu', device)} torch {meta['torch']} transformers "
          f"{meta['transformers']} av {av_version}", flush=True)

    results = {"meta": meta, "cases": [], "skipped": []}
    results["matmul"] = matmul_rate(device)
    results["copy_bw"] = copy_bandwidth(device)
    rate = results["matmul"]["flops_per_s"]
    print(f"[bench gpu] bf16 matmul {rate / 1e12:.1f} TFLOP/s", flush=True)

    # video
    if args.video:
        vpath = Path(args.video)
        from ..video import probe_video
        info = probe_video(vpath)
        meta["video"] = {"path": str(vpath), "frames": info.num_frames, "height": info.height,
                         "width": info.width, "fps": info.fps, "bytes": vpath.stat().st_size}
    else:
        n = args.video_frames or max(args.frames)
        vdir = Path(args.video_dir or out)
        vpath = vdir / f"bench_{n}f_{H}x{W}.mp4"
        meta["video"] = make_video(vpath, n, (H, W))
        print(f"[bench gpu] wrote {vpath} ({meta['video']['bytes'] / 2 ** 20:.1f} MiB) in "
              f"{meta['video']['seconds_to_make']:.1f} s", flush=True)

    if args.arch == "qwen2.5-vl-7b":
        model, build_s = build_model(args.tiny, device, dtype, args.pixels)
        model.adapter.compile_vision = args.compile_vision
        model.adapter.fuse_text = args.fuse_text
    else:
        from .archs import build_arch_model
        model, build_s = build_arch_model(args.arch, device, dtype, pixels=args.pixels, tiny=args.tiny)
    meta["model"] = model.name
    meta["frames_per_slice"] = model.adapter.frames_per_slice
    meta["build_seconds"] = build_s
    meta["params"] = param_counts(model)
    res_hw = model.adapter.resized_size(H, W, args.pixels, args.pixels)
    rows, cols = model.adapter.token_grid(res_hw)
    meta["tokens_per_slice"] = rows * cols
    from ..features import default_decode_workers
    meta["decode_workers"] = args.decode_workers if args.decode_workers is not None else default_decode_workers()
    vis_per_slice = vision_flops_per_slice(model, res_hw)
    meta["vision_flops_per_slice"] = vis_per_slice
    print(f"[bench gpu] model built in {build_s:.1f} s: {meta['params']['total'] / 1e9:.2f} B params, "
          f"{meta['params']['bytes'] / 2 ** 30:.2f} GiB", flush=True)

    counter = LLMCounter(model)
    with counter:
        # warm-up: kernels, cuBLAS handles, the processor, compile (shapes of the real runs)
        t0 = time.perf_counter()
        warm = min(max(4 * args.group_size, 64), meta["video"]["frames"])
        for m in ("adapttoken", "lite", "uniform"):
            run_case(model, vpath, warm, m, args, counter, vis_per_slice)
        meta["warmup_seconds"] = time.perf_counter() - t0
        print(f"[bench gpu] warm-up {meta['warmup_seconds']:.1f} s", flush=True)

        def record(c: Case):
            d = c.__dict__.copy()
            d["derived"] = derived(d, rate)
            results["cases"].append(d)
            s = d["seconds"]
            print(f"[bench gpu] {c.frames:6d} {c.method:16s} wall {c.wall:7.2f} s  "
                  + " ".join(f"{k}={s.get(k, 0):.2f}" for k in STAGES if s.get(k))
                  + f"  floor {d['derived']['floor_s']:.2f} s  x{d['derived']['x_floor']:.2f}"
                  f"  peak {c.peak_gib:.1f} GiB  passes {c.group_passes}/{c.groups}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

        def over_time() -> bool:
            return bool(args.time_limit) and time.perf_counter() - t_begin > args.time_limit

        def guarded(label, fn):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - keep the other cases (an OOM, say)
                import traceback
                traceback.print_exc()
                results.setdefault("errors", []).append(f"{label}: {type(e).__name__}: {e}"[:500])
                model.clear_cache()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                return None

        def set_card(L):
            if device.type != "cuda":
                return
            total = torch.cuda.get_device_properties(device).total_memory
            if args.card_gib and L >= args.card_from:
                frac = min(1.0, args.card_gib * 2 ** 30 / total)
            else:
                frac = 1.0
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(frac, index)

        for L in args.frames:
            set_card(L)
            for m in args.methods:
                if over_time():
                    results["skipped"].append(f"{L} {m}")
                    continue
                if m == "second_question":
                    if not any(c["frames"] == L and c["method"] == "adapttoken" for c in results["cases"]):
                        continue
                    c = guarded(f"{L} {m}", lambda: run_case(model, vpath, L, "adapttoken", args, counter,
                                                             vis_per_slice, question=Q2, fresh=False))
                    if c is not None:
                        c.method = "second_question"
                else:
                    c = guarded(f"{L} {m}", lambda: run_case(model, vpath, L, m, args, counter,
                                                             vis_per_slice))
                if c is not None:
                    record(c)
        model.clear_cache()
        set_card(0)

        # variants of the full method at the smallest length: what each optimisation is worth
        if args.variants is not None:
            L = args.variants_frames or min(args.frames)
            base = dict(feature_device=args.feature_device, decode_workers=args.decode_workers,
                        no_overlap=args.no_overlap)
            table = {
                "threads": ("no threads, no overlap", dict(decode_workers=0, no_overlap=True), True),
                "hf_vision": ("transformers vision tower", dict(compile_vision=False), False),
                "cpu_features": ("features in CPU memory", dict(feature_device="cpu"), True),
                "one_thread": ("1 decoder thread", dict(decode_workers=1), True),
                "eager_vision": ("fast vision tower, eager (compile off)", dict(compile_vision=False), True),
                "compiled_vision": ("fast vision tower, compile forced, chunks padded",
                                    dict(compile_vision=True), True),
                "unfused_text": ("language model: transformers' eager norm/MLP/rotary (no fused kernels)",
                                 dict(fuse_text=False), True),
                "repeat": ("as benchmarked above, run again (run-to-run spread)", {}, True),
            }
            names = args.variants or ["threads", "hf_vision", "cpu_features", "one_thread"]
            variants = [table[n] for n in names]
            results["variants"] = []
            base["compile_vision"] = args.compile_vision
            base["fuse_text"] = args.fuse_text
            for name, change, fast in variants:
                if over_time():
                    results["skipped"].append(f"variant {name}")
                    continue
                for k, v in change.items():
                    setattr(args, k, v)
                model.adapter.use_fast_vision = fast
                model.adapter.compile_vision = args.compile_vision
                model.adapter.fuse_text = args.fuse_text
                c = guarded(f"variant {name}", lambda: run_case(model, vpath, L, "adapttoken", args,
                                                                counter, vis_per_slice))
                for k, v in base.items():
                    setattr(args, k, v)
                model.adapter.use_fast_vision = True
                model.adapter.compile_vision = args.compile_vision
                model.adapter.fuse_text = args.fuse_text
                model.clear_cache()
                if c is not None:
                    d = c.__dict__.copy()
                    d["variant"] = name
                    d["derived"] = derived(d, rate)
                    results["variants"].append(d)
                    print(f"[bench gpu] variant {name:28s} {L} frames wall {c.wall:7.2f} s  "
                          + " ".join(f"{k}={c.seconds.get(k, 0):.2f}" for k in STAGES
                                     if c.seconds.get(k)), flush=True)
                    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

        if args.disk_cache and not over_time():
            import shutil
            import tempfile
            L = min(args.frames)
            cdir = Path(tempfile.mkdtemp(prefix="adapttoken-cache-"))
            try:
                a = run_case(model, vpath, L, "adapttoken", args, counter, vis_per_slice, cache_dir=cdir)
                b = run_case(model, vpath, L, "adapttoken", args, counter, vis_per_slice, cache_dir=cdir)
                size = sum(p.stat().st_size for p in cdir.rglob("*.safetensors"))
                results["disk_cache"] = {
                    "frames": L, "first_wall": a.wall, "second_wall": b.wall,
                    "second_decoded": b.decoded_frames, "second_encoded": b.encoded_slices,
                    "second_loaded": b.features.get("cache_loaded_slices", 0),
                    "second_cache_load_s": b.seconds.get("cache_load", 0.0), "bytes": size,
                    "first_seconds": a.seconds, "second_seconds": b.seconds}
                print(f"[bench gpu] disk cache {L}: {a.wall:.2f} s -> {b.wall:.2f} s "
                      f"(decoded {b.decoded_frames}, loaded {results['disk_cache']['second_loaded']})",
                      flush=True)
            finally:
                model.clear_cache()
                shutil.rmtree(cdir, ignore_errors=True)

    results["targets"] = targets(results)
    results["meta"]["total_seconds"] = time.perf_counter() - t_begin
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    (out / "README.md").write_text(md)
    try:
        plot(results, out / "bench_gpu.png")
    except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"[bench gpu] plot failed: {type(e).__name__}: {e}", flush=True)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
