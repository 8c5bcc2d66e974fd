"""The resumable, video-sharded run.

* One append-only JSONL per worker (`OUT/preds/worker<r>-of-<W>.jsonl`), one line per (question,
  method), written with a single `write` and flushed + fsynced before the next question starts.
  A line cut by a kill is skipped when read (and a newline is put after it before appending).
* Resume: every `preds/*.jsonl` is read and finished (question id, method) pairs are skipped, so
  a restart with another number of workers skips the same work.
* Sharding by video: all questions and all methods of a video run on one worker, longest videos
  first, assigned greedily to the least-loaded worker; the vision features of a video are
  computed once per sampling and shared by every question and method that uses that sampling
  (native has its own sampling: the benchmark convention's frames and pixel cap).
* The method order rotates from video to video, so each method is the first ("cold": it decodes
  and encodes) on its share of videos; the others on that video are "warm".
* Preflight: every video of the shard is probed before the model loads; a missing or unreadable
  video becomes an error row per question and method, and the run goes on.
"""
from __future__ import annotations

import heapq
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from . import profiles
from .data import Item

PAPER_CONFIG = {"num_frames": 4096, "budget": 7040}    # the paper's Table 1 setting
ALL_METHODS = ("native", "adapttoken", "lite", "uniform", "even_split")
# The baseline row ("native"): uniformly sampled frames, every token, no selection. Defaults are
# the lmms-eval Qwen2.5-VL wrapper's (max_num_frames 32, max_pixels 1605632); set them per run.
NATIVE_FRAMES = 32
NATIVE_MAX_PIXELS = 1605632
# benchmarking aids (`--arch`): architectures built with random weights (bench/eval_aids.py)
ARCHS = ("qwen2.5-vl-7b", "tiny")


@dataclass
class RunSpec:
    bench: str
    data: str
    out: str
    methods: list = field(default_factory=lambda: ["native", "adapttoken", "lite"])
    profile: str = "flexselect2025"
    config_name: str = "default"
    num_frames: int = 1024
    budget: int = 7040
    max_pixels: int | None = 308 * 560
    min_pixels: int | None = None
    group_size: int = 64
    stop_threshold: float = 0.2
    native_frames: int = NATIVE_FRAMES
    native_max_pixels: int | None = NATIVE_MAX_PIXELS
    native_min_pixels: int | None = None
    subtitles: bool = False
    model: str = ""
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    device_map: str | None = None      # "auto": accelerate spreads the layers (one process)
    quantization: str = "none"         # nf4 / int8: bitsandbytes weights (models/quant.py)
    cache_dir: str | None = None
    decode_workers: int | None = None
    worker: int = 0
    workers: int = 1
    limit: int | None = None
    seed: int = 0
    quiet: bool = False
    retry_errors: bool = False
    # benchmarking aids: random weights (speed only) and Lite's stop fixed at a share of the groups
    arch: str | None = None
    lite_stop_fraction: float | None = None
    warmup: bool = False

    # what changes an answer: a resumed run must match these
    def fingerprint(self) -> dict:
        keys = ("bench", "profile", "config_name", "num_frames", "budget", "max_pixels", "min_pixels",
                "group_size", "stop_threshold", "native_frames", "native_max_pixels",
                "native_min_pixels", "subtitles", "seed", "arch", "lite_stop_fraction", "quantization")
        d = {k: getattr(self, k) for k in keys}
        d["model"] = (f"{self.arch} (random weights)" if self.arch
                      else Path(self.model).name if self.model else "bundled")
        return d


def name_config(num_frames: int, budget: int) -> str:
    return "paper" if (num_frames, budget) == (PAPER_CONFIG["num_frames"], PAPER_CONFIG["budget"]) else "custom"


def method_config(spec: RunSpec, method: str):
    from ..pipeline import AdaptTokenConfig
    tokens = profiles.max_new_tokens(spec.profile, spec.bench)
    if method == "native":
        return AdaptTokenConfig(num_frames=spec.native_frames, max_pixels=spec.native_max_pixels,
                                min_pixels=spec.native_min_pixels, budget=10 ** 9,
                                max_new_tokens=tokens, seed=spec.seed, cache_dir=spec.cache_dir,
                                decode_workers=spec.decode_workers)
    return AdaptTokenConfig(num_frames=spec.num_frames, max_pixels=spec.max_pixels,
                            min_pixels=spec.min_pixels, group_size=spec.group_size,
                            budget=spec.budget, stop_threshold=spec.stop_threshold,
                            max_new_tokens=tokens, seed=spec.seed, cache_dir=spec.cache_dir,
                            decode_workers=spec.decode_workers)


def sampling_of(method: str) -> str:
    return "native" if method == "native" else "main"


# --- the prediction files ----------------------------------------------------------------------

def pred_files(out) -> list[Path]:
    return sorted((Path(out) / "preds").glob("*.jsonl"))


def read_rows(out) -> tuple[list[dict], int]:
    """Every complete row of every worker file (per (qid, method) the first, or the first answer
    after error rows when errors were retried) and the number of lines skipped (cut by a kill)."""
    rows, seen, bad = [], {}, 0
    for f in pred_files(out):
        with open(f, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    bad += 1
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                key = (r.get("qid"), r.get("method"))
                if key in seen:                     # a retried error row: the answer wins
                    if rows[seen[key]].get("error") and not r.get("error"):
                        rows[seen[key]] = r
                    continue
                seen[key] = len(rows)
                rows.append(r)
    return rows, bad


class RowWriter:
    """Append-only JSONL: one os.write per row, then fsync."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":            # a line cut by a kill: close it off
                    os.write(self.fd, b"\n")

    def write(self, row: dict) -> None:
        os.write(self.fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- sharding ----------------------------------------------------------------------------------

def group_by_video(items: list[Item]) -> list[list[Item]]:
    order, groups = [], {}
    for it in items:
        key = it.video or f"missing:{it.video_id}"
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(it)
    return [groups[k] for k in order]


def _length(items: list[Item]) -> float:
    it = items[0]
    if it.duration_s is not None:
        return float(it.duration_s)
    try:
        return float(os.path.getsize(it.video)) / 1e6       # MB as a stand-in for length
    except OSError:
        return 0.0


def shard(items: list[Item], workers: int) -> list[list[list[Item]]]:
    """Videos longest first, each to the least-loaded worker (load = length x questions, plus one
    per video); returns per worker its videos in order (longest first). Deterministic."""
    videos = group_by_video(items)
    videos.sort(key=lambda v: (-_length(v), v[0].video_id))
    heap = [(0.0, w) for w in range(workers)]
    out = [[] for _ in range(workers)]
    for v in videos:
        load, w = heapq.heappop(heap)
        out[w].append(v)
        heapq.heappush(heap, (load + max(_length(v), 1e-3) * (1 + 0.1 * len(v)), w))
    return out


# --- preflight ---------------------------------------------------------------------------------

def preflight(videos: list[list[Item]]) -> dict[str, str]:
    """video_id -> why it cannot be read ("" when fine); probes each file (no decoding)."""
    from ..video import probe_video
    bad = {}
    for v in videos:
        it = v[0]
        if not it.video:
            bad[it.video_id] = f"missing: no file for {it.video_id!r}" + (
                f" ({it.fields['missing_path']})" if it.fields.get("missing_path") else "")
            continue
        try:
            probe_video(it.video)
        except Exception as e:  # noqa: BLE001 - any failure to read is an error row later
            bad[it.video_id] = f"unreadable: {it.video}: {type(e).__name__}: {e}"
    return bad


# --- the run -----------------------------------------------------------------------------------

def check_run_dir(spec: RunSpec) -> None:
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "run.json"
    fp = spec.fingerprint()
    if meta.exists():
        old = json.loads(meta.read_text()).get("fingerprint", {})
        for k in ("arch", "lite_stop_fraction"):        # runs written before these existed
            old.setdefault(k, None)
        old.setdefault("quantization", "none")
        diff = {k: (old.get(k), v) for k, v in fp.items() if old.get(k) != v}
        if diff:
            raise InputError(f"{out} holds a run with other settings ("
                             + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                             + "): use another --out, or the same settings to resume")
        return
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fp, "spec": asdict(spec)}, indent=1))
    os.replace(tmp, meta)


def _fmt_eta(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _subtitle_lines(item: Item, cfg, cache: dict):
    """The subtitle lines at the sampled frames' times of this sampling (cached per video)."""
    from ..decode import open_video
    from . import subtitles as subs
    key = (item.video, cfg.num_frames, cfg.max_pixels)
    if key not in cache:
        lines = []
        if item.subtitles:
            v = open_video(item.video, num_frames=cfg.num_frames, max_pixels=cfg.max_pixels,
                           min_pixels=cfg.min_pixels)
            raw = subs.read_subtitles(item.subtitles, item.subtitle_offset, v.info.duration)
            lines = subs.subtitles_at(raw, v.plan.timestamps)
        cache[key] = lines
    return cache[key]


def base_row(spec: RunSpec, item: Item, method: str) -> dict:
    return {"qid": item.qid, "method": method, "bench": spec.bench, "video_id": item.video_id,
            "video": item.video, "gold": item.answer, "n_options": len(item.options),
            "fields": item.fields, "profile": spec.profile, "worker": spec.worker,
            "workers": spec.workers}


class _NoWriter:
    """The rows of a tensor-parallel copy are written by its first rank only."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def run(spec: RunSpec, items: list[Item], model=None, log=None, layout=None) -> dict:
    """Run this worker's shard; returns counts. `model`: an already loaded Model (tests);
    `layout`: this rank's distributed.Layout under torchrun (worker = its replica)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    writes = layout is None or layout.tp_rank == 0
    if spec.quiet or not writes:
        log = lambda s: None  # noqa: E731
    unknown = [m for m in spec.methods if m not in ALL_METHODS]
    if unknown:
        raise InputError(f"--method {unknown[0]!r} is not known: use {', '.join(ALL_METHODS)}")
    if not 0 <= spec.worker < spec.workers:
        raise InputError(f"--worker {spec.worker} must be in 0..{spec.workers - 1}")
    check_run_dir(spec)
    if spec.limit is not None:
        items = items[: spec.limit]
    order = shard(items, spec.workers)
    rank_of = {id(v): i for i, v in enumerate(sorted((v for w in order for v in w),
                                                     key=lambda v: (-_length(v), v[0].video_id)))}
    mine = order[spec.worker]
    done = {(r["qid"], r["method"]) for r in read_rows(spec.out)[0]
            if not (spec.retry_errors and r.get("error"))}
    todo = [(v, it, m) for v in mine for it in v for m in spec.methods if (it.qid, m) not in done]
    log(f"eval {spec.bench}: {len(items)} questions on {len(group_by_video(items))} videos; "
        f"worker {spec.worker}/{spec.workers}: {sum(len(v) for v in mine)} questions on {len(mine)} videos, "
        f"{len(todo)} (question, method) rows to run, {sum(len(v) for v in mine) * len(spec.methods) - len(todo)} done")
    t0 = time.perf_counter()
    bad = preflight(mine)
    pf = Path(spec.out) / f"preflight-worker{spec.worker}-of-{spec.workers}.json"
    if writes:
        pf.write_text(json.dumps({"videos": len(mine), "bad": bad}, indent=1))
    if bad:
        log(f"preflight: {len(bad)} of {len(mine)} videos cannot be read (error rows; list in {pf.name}):")
        for k, why in list(bad.items())[:20]:
            log(f"  {why}")
    else:
        log(f"preflight: all {len(mine)} videos readable ({time.perf_counter() - t0:.1f} s)")
    writer = (RowWriter(Path(spec.out) / "preds" / f"worker{spec.worker}-of-{spec.workers}.jsonl")
              if writes else _NoWriter())
    stats = {"written": 0, "errors": 0}
    running = {m: [0, 0] for m in spec.methods}
    try:
        if any(v[0].video_id not in bad for v, _, _ in todo) and model is None:
            model = load(spec, log, layout)
        if spec.warmup and model is not None:
            warmup(model, spec, [v for v in mine if v[0].video_id not in bad], sub_cache={}, log=log)
        t_run, n_run = time.perf_counter(), 0
        sub_cache = {}
        for v in mine:
            rows_v = [(it, m) for it in v for m in spec.methods if (it.qid, m) not in done]
            if not rows_v:
                continue
            vid = v[0].video_id
            if vid in bad:
                for it, m in rows_v:
                    writer.write({**base_row(spec, it, m), "error": bad[vid], "raw": None, "letter": "",
                                  "correct": False, "cold": None})
                    stats["written"] += 1
                    stats["errors"] += 1
                    running[m][1] += 1
                continue
            k = rank_of.get(id(v), 0)
            main = [m for m in spec.methods if m != "native"]
            main = main[k % len(main):] + main[: k % len(main)] if main else []
            seq = (["native"] if "native" in spec.methods else []) + main
            seen_sampling = set()
            for m in seq:
                cfg = method_config(spec, m)
                for it in v:
                    if (it.qid, m) in done:
                        continue
                    row = base_row(spec, it, m)
                    cold = sampling_of(m) not in seen_sampling
                    row.update(run_one(model, spec, it, m, cfg, sub_cache))
                    row["cold"] = cold
                    if not row.get("error"):
                        seen_sampling.add(sampling_of(m))
                    writer.write(row)
                    stats["written"] += 1
                    stats["errors"] += bool(row.get("error"))
                    running[m][0] += bool(row["correct"])
                    running[m][1] += 1
                    n_run += 1
                    el = time.perf_counter() - t_run
                    left = len(todo) - stats["written"]
                    accs = "  ".join(f"{mm} {100 * a / n:.1f}% ({a}/{n})" for mm, (a, n) in running.items() if n)
                    log(f"[{stats['written']}/{len(todo)}] {it.qid} {m}: {row.get('letter') or '-'} "
                        f"(gold {it.answer}) {'ok' if row['correct'] else 'wrong'}"
                        f"{' ERROR ' + row['error'][:80] if row.get('error') else ''} "
                        f"{row.get('wall_s', 0):.2f}s | {accs} | ETA {_fmt_eta(el / max(n_run, 1) * left)}")
            if model is not None:
                model.clear_cache()
    except KeyboardInterrupt:
        log(f"interrupted: {stats['written']} rows written this run, every one complete; "
            f"run the same command again to resume")
        raise
    finally:
        writer.close()
    return stats


def load(spec: RunSpec, log, layout=None):
    """The run's model: --model (or the bundled one), or --arch with random weights (under
    torchrun --device is the rank's GPU)."""
    if spec.arch:
        if layout is not None and layout.tp > 1:
            raise InputError("--arch (random weights) is not built tensor-parallel by eval: time "
                             "tensor parallel with `bench gpu --tp N`, or evaluate a --model folder")
        from ..bench.eval_aids import build_random_model
        model, secs, dt = build_random_model(spec.arch, spec.device, spec.dtype,
                                             quantization=spec.quantization)
        log(f"model: {spec.arch} with random weights ({dt}, {model.adapter.device}), built in "
            f"{secs:.1f} s: a speed run, its answers are random")
        _write_json(Path(spec.out) / f"model-worker{spec.worker}-of-{spec.workers}.json",
                    {"arch": spec.arch, "dtype": dt, "device": str(model.adapter.device),
                     "build_s": round(secs, 3), "name": model.name})
        return model
    from ..defaults import default_model_dir
    from ..models.loading import load_model
    return load_model(spec.model or default_model_dir(), dtype=spec.dtype, device=spec.device,
                      attn_implementation=spec.attn, device_map=spec.device_map,
                      layout=layout if layout is not None and layout.tp > 1 else None,
                      quantization=spec.quantization)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def warmup(model, spec: RunSpec, videos: list[list[Item]], sub_cache: dict, log) -> None:
    """One question per method on the first readable video, not recorded, then every cache emptied:
    kernel set-up and compilation stay out of the first recorded (cold) question."""
    if not videos:
        return
    it = videos[0][0]
    t0 = time.perf_counter()
    per = {}
    for m in spec.methods:
        t = time.perf_counter()
        r = run_one(model, spec, it, m, method_config(spec, m), sub_cache)
        per[m] = {"wall_s": round(time.perf_counter() - t, 3), "error": r.get("error")}
    model.clear_cache()
    total = time.perf_counter() - t0
    _write_json(Path(spec.out) / f"warmup-worker{spec.worker}-of-{spec.workers}.json",
                {"video": it.video, "qid": it.qid, "seconds": round(total, 3), "methods": per})
    log(f"warm-up: {len(per)} methods on {it.video_id} in {total:.1f} s (not recorded; caches emptied)")


def run_one(model, spec: RunSpec, item: Item, method: str, cfg, sub_cache: dict) -> dict:
    """One (question, method): the answer, its parse and the costs; an exception -> an error row."""
    from ..pipeline import ask
    try:
        lines = _subtitle_lines(item, cfg, sub_cache) if spec.subtitles else None
        q = profiles.question_for(spec.profile, item, lines)
        t0 = time.perf_counter()
        if method == "lite" and spec.lite_stop_fraction is not None:
            from ..bench.eval_aids import ask_fixed_stop
            res = ask_fixed_stop(model, item.video, q, cfg, spec.lite_stop_fraction)
        else:
            res = ask(model, item.video, q, config=cfg, method="uniform" if method == "native" else method)
        wall = time.perf_counter() - t0
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        if model is not None:
            model.clear_cache()
        return {"error": f"{type(e).__name__}: {e}", "raw": None, "letter": "", "correct": False}
    letter = profiles.parse(spec.profile, spec.bench, res.answer, item.letters)
    probs = res.option_probs or {}
    return {"error": None, "raw": res.answer, "letter": letter, "correct": letter == item.answer,
            "option_probs": probs, "argmax": max(probs, key=probs.get) if probs else None,
            "seconds": res.seconds, "wall_s": round(wall, 6), "group_passes": res.group_passes,
            "groups": len(res.groups), "skipped_groups": len(res.skipped_groups),
            "decoded_frames": res.decoded_frames, "encoded_slices": res.encoded_slices,
            "kept_tokens": len(res.kept_tokens), "num_frames": res.num_frames,
            "num_slices": res.num_slices, "tokens_per_slice": res.tokens_per_slice,
            "max_new_tokens": cfg.max_new_tokens, "subtitle_lines": None if lines is None else len(lines),
            "prompt_chars": len(q.prompt_text())}
