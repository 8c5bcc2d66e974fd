"""Benchmarking aids for `python -m adapttoken eval` (speed on a full-size architecture without
its weights or the benchmark's videos). Nothing here is part of an accuracy run.

* `make-synthetic videomme`: a small data set in VideoMME's exact on-disk layout
  (`videomme/test-00000-of-00001.parquet` + `data/<videoID>.mp4`, docs/EVAL.md) with real H.264
  videos of a chosen resolution, length and frame rate (bench gpu's `make_video`: a rendered
  synthetic clip, looped with a drift and a frame counter, so decoding is real work):

      python -m adapttoken eval make-synthetic videomme --out DIR --videos 4 --questions 2 \\
          --frames 2400 --resolution 1280x720 --fps 30

* `build_random_model`: `eval --arch qwen2.5-vl-7b` (bench gpu's random bf16 Qwen2.5-VL-7B,
  `gpu_measure.build_model`) or `--arch tiny` (its tiny config, for CPU tests), with the real
  processor's per-frame pixel range so `--max-pixels` caps frames as with a downloaded model.
* `ask_fixed_stop`: `ask(..., method="lite")` with Lite's stop after exactly
  k = max(1, round(fraction * groups)) groups whatever the entropies (bench gpu's `StopAfter`):
  random weights are never confident, so the stop point is a parameter (`--lite-stop-fraction`).

Random weights answer at random: a run with `--arch` measures seconds, never accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ARCHS = ("qwen2.5-vl-7b", "tiny")
# Qwen2.5-VL's released processor: min_pixels 56*56, max_pixels 28*28*16384
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056
LETTERS = "ABCD"
# Questions in VideoMME's shape (4 options, each "A. ..."); random weights make their content moot.
QUESTIONS = (
    ("What colour was the object that appeared in the video?", ("red", "green", "blue", "yellow")),
    ("How many objects moved across the screen?", ("one", "two", "three", "four")),
    ("Which shape appeared first in the video?", ("a circle", "a square", "a triangle", "a star")),
    ("Where in the frame did the last object appear?", ("top left", "top right", "bottom left",
                                                         "bottom right")),
)


def duration_class(seconds: float) -> str:
    """VideoMME's duration classes: short < 2 min, medium 4-15 min, long 30-60 min (between the
    classes: the nearer one below)."""
    return "short" if seconds < 240 else "medium" if seconds < 1800 else "long"


def parse_resolution(s: str) -> tuple[int, int]:
    """'1280x720' (width x height) -> (height, width)."""
    w, sep, h = s.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 16 or int(h) < 16:
        raise argparse.ArgumentTypeError(f"--resolution {s!r}: use WIDTHxHEIGHT, e.g. 1280x720")
    if int(w) % 2 or int(h) % 2:
        raise argparse.ArgumentTypeError(f"--resolution {s!r}: H.264 (yuv420p) needs even sizes")
    return int(h), int(w)


def write_videomme(out, videos: int = 4, questions: int = 2, frames: int = 2400,
                   size: tuple[int, int] = (720, 1280), fps: float = 30.0, gop: int | None = None,
                   seed: int = 0, log=print) -> dict:
    """A VideoMME-layout set under `out`; returns its manifest (also written to
    `out/synthetic.json`). size = (height, width). Existing videos of the same settings are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .gpu import make_video
    if videos < 1 or questions < 1 or frames < 2:
        raise ValueError("need at least 1 video, 1 question and 2 frames")
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    gop = gop or max(1, round(5 * fps))                 # a key frame every 5 s
    H, W = size
    t0 = time.perf_counter()
    rows, made = [], []
    for i in range(videos):
        vid = f"syn{i:03d}"
        path = out / "data" / f"{vid}.mp4"
        stamp = out / "data" / f"{vid}.json"
        want = {"frames": frames, "height": H, "width": W, "fps": fps, "gop": gop, "seed": seed + i}
        if not (path.exists() and stamp.exists() and json.loads(stamp.read_text()) == want):
            t = time.perf_counter()
            make_video(path, frames, (H, W), fps=fps, gop=gop, seed=seed + i)
            stamp.write_text(json.dumps(want))
            log(f"make-synthetic: {path.name}: {frames} frames {W}x{H} at {fps:g} fps, "
                f"{path.stat().st_size / 2 ** 20:.1f} MiB in {time.perf_counter() - t:.1f} s")
        made.append({"videoID": vid, "bytes": path.stat().st_size})
        for j in range(questions):
            text, opts = QUESTIONS[(i + j) % len(QUESTIONS)]
            rows.append({"video_id": f"{i:03d}", "duration": duration_class(frames / fps),
                         "domain": "Synthetic", "sub_category": "Synthetic",
                         "url": f"https://example.invalid/{vid}", "videoID": vid,
                         "question_id": f"{i:03d}-{j + 1}", "task_type": "Object Recognition",
                         "question": text,
                         "options": [f"{LETTERS[k]}. {o}" for k, o in enumerate(opts)],
                         "answer": LETTERS[(i + 2 * j) % 4]})
    (out / "videomme").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(out / "videomme" / "test-00000-of-00001.parquet"))
    manifest = {"bench": "videomme", "layout": "videomme/test-00000-of-00001.parquet + data/<videoID>.mp4",
                "videos": videos, "questions_per_video": questions, "frames": frames,
                "width": W, "height": H, "fps": fps, "gop": gop, "seed": seed,
                "seconds_per_video": frames / fps, "codec": "h264 (libx264)",
                "note": "synthetic: answers are arbitrary letters; for speed runs only",
                "made_seconds": round(time.perf_counter() - t0, 3), "files": made}
    (out / "synthetic.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def make_synthetic_main(argv) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapttoken eval make-synthetic",
        description="Benchmarking aid: write a small synthetic data set in a benchmark's on-disk "
                    "layout (real H.264 videos at the chosen resolution and length) for speed runs "
                    "(`eval ... --arch`). Its answers are arbitrary: no accuracy means anything on it.")
    p.add_argument("bench", choices=["videomme"])
    p.add_argument("--out", required=True, help="folder to write (pass it to `eval videomme --data`)")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--questions", type=int, default=2, help="questions per video")
    p.add_argument("--frames", type=int, default=2400, help="frames per video")
    p.add_argument("--resolution", type=parse_resolution, default=(720, 1280),
                   help="WIDTHxHEIGHT (default 1280x720)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--gop", type=int, default=None, help="key frame interval (default: 5 s of frames)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    m = write_videomme(a.out, a.videos, a.questions, a.frames, a.resolution, a.fps, a.gop, a.seed)
    print(f"make-synthetic: {a.videos} videos x {a.questions} questions in VideoMME's layout under "
          f"{a.out} ({m['made_seconds']:.1f} s)")
    return 0


# --- the random-weight model and Lite's fixed stop ----------------------------------------------

def build_random_model(arch: str, device: str = "auto", dtype: str = "auto",
                       quantization: str | None = None):
    """(Model, build seconds, resolved dtype name): random weights made on the device; bf16 on CUDA
    unless `dtype` says otherwise, float32 on the CPU; `quantization` (nf4/int8): the language
    model's weights then quantized in memory (models/quant.py)."""
    import torch

    from .gpu_measure import build_model
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not known: use {', '.join(ARCHS)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else "cpu" if device == "auto" else device)
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    dt = names.get(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model, secs = build_model(arch == "tiny", dev, dt, QWEN_MAX_PIXELS, quantization=quantization)
    # the released processor's per-frame range (build_model pins min = max for bench gpu)
    size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    proc = model.adapter.processor
    for sub in (proc.video_processor, proc.image_processor):
        sub.size = type(sub.size)(**size) if not isinstance(sub.size, dict) else dict(size)
    return model, secs, str(dt).replace("torch.", "")


def fixed_stop_k(groups: int, fraction: float) -> int:
    return max(1, min(groups, round(fraction * groups)))


def ask_fixed_stop(model, video_path, question, config, fraction: float):
    """`pipeline.ask(..., method="lite")` with Lite's stop after exactly
    `fixed_stop_k(groups, fraction)` groups (bench gpu's StopAfter) instead of the entropy rule."""
    from ..budget import allocate
    from ..entropy import score_groups
    from ..groups import split_groups
    from ..pipeline import answer, prepare
    from ..rank import RankedGroups
    from .gpu import StopAfter

    video = prepare(model, video_path, config)
    groups = split_groups(video, config.group_size, config.layout)
    ranked = RankedGroups(model, groups, question, config.layer, config.aggregation)
    scored = score_groups(ranked, config.entropy_mode, config.entropy_tokens)
    scored = scored.with_stop(StopAfter(fixed_stop_k(len(groups), fraction)))
    sel = allocate(scored, config.budget, config.relevance, config.tau, config.floor,
                   config.redundancy_threshold)
    return answer(sel, config.max_new_tokens, config.do_sample, config.temperature, config.top_p,
                  config.seed)
