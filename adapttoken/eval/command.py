"""`python -m adapttoken eval BENCH --data DIR ...`, `python -m adapttoken eval score OUT` and the
benchmarking aid `python -m adapttoken eval make-synthetic videomme --out DIR ...` (bench/eval_aids.py)."""
from __future__ import annotations

import argparse
import sys

from ..defaults import QUANTIZATION_CHOICES
from . import BENCHES
from .profiles import PROFILES
from .runner import ALL_METHODS, ARCHS, NATIVE_FRAMES, NATIVE_MAX_PIXELS, PAPER_CONFIG


def _int_or_none(s: str):
    return None if s.lower() in ("none", "0") else int(s)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapttoken eval",
                                description="Run a benchmark (resumable, sharded by video) and write a "
                                            "Table-1-shaped report into --out. Also: `eval score OUT` "
                                            "(re-score, no model); `eval make-synthetic videomme --out "
                                            "DIR` (a synthetic set for speed runs with --arch).")
    p.add_argument("bench", choices=BENCHES, help="jsonl: your own file of {video, question, options, answer}")
    p.add_argument("--data", required=True, help="the benchmark's folder (for jsonl: the .jsonl file)")
    p.add_argument("--model", default=None, help="local model folder (default: the bundled tiny model)")
    p.add_argument("--method", nargs="+", default=["native", "adapttoken", "lite"], choices=ALL_METHODS,
                   help="methods to run (native = the baseline row: uniform frames, every token)")
    p.add_argument("--profile", choices=PROFILES, default="flexselect2025",
                   help="prompt texts, new tokens and answer parser (default: what the paper's baselines ran)")
    p.add_argument("--config", choices=["paper", "default"], default="default",
                   help="paper: 4096 frames, budget 7040 (the paper's figures are shown beside it); "
                        "default: 1024 frames, budget 7040")
    p.add_argument("--frames", type=int, default=None, help="frames sampled for the selection methods")
    p.add_argument("--budget", type=int, default=None, help="visual tokens kept")
    p.add_argument("--max-pixels", type=_int_or_none, default=308 * 560, help="per-frame pixel cap (none: off)")
    p.add_argument("--min-pixels", type=_int_or_none, default=None)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--stop-threshold", type=float, default=0.2)
    p.add_argument("--native-frames", type=int, default=NATIVE_FRAMES,
                   help=f"frames of the native baseline (default {NATIVE_FRAMES}, lmms-eval's Qwen2.5-VL default)")
    p.add_argument("--native-max-pixels", type=_int_or_none, default=NATIVE_MAX_PIXELS,
                   help=f"per-frame pixel cap of the native baseline (default {NATIVE_MAX_PIXELS})")
    p.add_argument("--native-min-pixels", type=_int_or_none, default=None)
    p.add_argument("--subtitles", action="store_true",
                   help="put the subtitles at the sampled frames' times before the question "
                        "(VideoMME, LongVideoBench; off: the paper's setting is video only)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--out", default=None, help="run folder (default eval_<bench>)")
    p.add_argument("--worker", type=int, default=0, help="this worker's index (0..workers-1)")
    p.add_argument("--workers", type=int, default=1, help="number of workers sharing the run (one per GPU)")
    p.add_argument("--retry-errors", action="store_true", help="run the error rows again")
    p.add_argument("--device", default="auto")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread the model's layers over every GPU of this process (accelerate)")
    p.add_argument("--tp", type=int, default=1,
                   help="under torchrun: one tensor-parallel copy over all processes (= --nproc-per-node)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="none",
                   help="language-model weights in 4-bit NF4 or 8-bit (bitsandbytes), computed in "
                        "--dtype (with --arch: the random weights quantized in memory); fp8: float8 "
                        "matmuls for the language model and vision tower (GPUs with FP8)")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--cache-dir", default=None, help="on-disk vision-feature cache")
    p.add_argument("--decode-workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    b = p.add_argument_group(
        "benchmarking aids (speed only: random weights answer at random, so no accuracy of such a "
        "run means anything; the report says so)")
    b.add_argument("--arch", choices=ARCHS, default=None,
                   help="instead of --model: this architecture with random weights (qwen2.5-vl-7b: "
                        "the full-size 7B, bf16 on CUDA, as `bench gpu` builds it; tiny: its tiny "
                        "config, for CPU tests)")
    b.add_argument("--lite-stop-fraction", type=float, default=None, metavar="F",
                   help="Lite stops after exactly round(F x groups) groups (at least 1) whatever the "
                        "entropies, as `bench gpu` does (random weights are never confident); "
                        "e.g. 0.25")
    b.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="with --arch: skip the warm-up (one question per method on the first video, "
                        "not recorded, then the caches are emptied) that keeps kernel set-up and "
                        "compilation out of the cold seconds")
    return p


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapttoken eval score",
                                description="Merge the worker files of a run and write its report "
                                            "(no model needed); --profile re-parses the raw outputs.")
    p.add_argument("out")
    p.add_argument("--profile", choices=PROFILES, default=None)
    return p


def spec_from_args(a):
    from ..errors import InputError
    from .runner import RunSpec, name_config
    if a.arch and a.model:
        raise InputError("--arch builds a model with random weights: leave --model out")
    if a.lite_stop_fraction is not None and not 0 < a.lite_stop_fraction <= 1:
        raise InputError(f"--lite-stop-fraction {a.lite_stop_fraction} must be within (0, 1]")
    frames = a.frames if a.frames is not None else (PAPER_CONFIG["num_frames"] if a.config == "paper" else 1024)
    budget = a.budget if a.budget is not None else PAPER_CONFIG["budget"]
    # `paper` whenever the paper's frames and budget are used; `default` when nothing was set
    name = name_config(frames, budget)
    if name != "paper" and a.config == "default" and a.frames is None and a.budget is None:
        name = "default"
    return RunSpec(bench=a.bench, data=a.data, out=a.out or f"eval_{a.bench}", methods=list(dict.fromkeys(a.method)),
                   profile=a.profile, config_name=name,
                   num_frames=frames, budget=budget, max_pixels=a.max_pixels, min_pixels=a.min_pixels,
                   group_size=a.group_size, stop_threshold=a.stop_threshold,
                   native_frames=a.native_frames, native_max_pixels=a.native_max_pixels,
                   native_min_pixels=a.native_min_pixels, subtitles=a.subtitles, model=a.model or "",
                   device=a.device, dtype=a.dtype, attn=a.attn, cache_dir=a.cache_dir,
                   device_map=a.device_map, quantization=a.quantization,
                   decode_workers=a.decode_workers, worker=a.worker, workers=a.workers, limit=a.limit,
                   seed=a.seed, quiet=a.quiet, retry_errors=a.retry_errors, arch=a.arch,
                   lite_stop_fraction=a.lite_stop_fraction,
                   warmup=bool(a.arch) if a.warmup is None else a.warmup)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import report
    if argv[:1] == ["make-synthetic"]:
        from ..bench.eval_aids import make_synthetic_main
        return make_synthetic_main(argv[1:])
    if argv[:1] == ["score"]:
        a = score_parser().parse_args(argv[1:])
        s = report.write(a.out, a.profile)
        print(report.markdown(s))
        return 0
    a = run_parser().parse_args(argv)
    from .data import load_items
    from .runner import run
    layout = _torchrun_layout(a)
    spec = spec_from_args(a)
    items = load_items(spec.bench, spec.data)
    expected = len(items) if spec.limit is None else min(spec.limit, len(items))
    if layout is None:
        stats = run(spec, items)
    else:
        stats = _run_under_torchrun(spec, items, layout)
        if not layout.is_main:
            return 0
    s = report.write(spec.out, None, expected)
    if not spec.quiet:
        print(report.markdown(s))
    print(f"eval: {stats['written']} rows written ({stats['errors']} errors); report in {spec.out}/report.md",
          file=sys.stderr)
    return 0


def _torchrun_layout(a):
    """Under torchrun the evaluation is data parallel: each rank (a whole model copy) is one of the
    run's workers (--worker/--workers come from the ranks)."""
    from ..distributed import init, launched_by_torchrun
    from ..errors import InputError
    if not launched_by_torchrun():
        if a.tp != 1:
            raise InputError(f"--tp {a.tp} runs under torchrun: torchrun --nproc-per-node {a.tp} "
                             f"-m adapttoken eval ... --tp {a.tp}")
        return None
    if a.worker != 0 or a.workers != 1:
        raise InputError("under torchrun the workers are the ranks' model copies: leave --worker and "
                         "--workers out")
    if a.device_map:
        raise InputError("--device-map auto is for one process: under torchrun use --tp N")
    layout = init(tp=a.tp, device=a.device)
    a.worker, a.workers, a.device = layout.replica, layout.replicas, str(layout.device)
    return layout


def _run_under_torchrun(spec, items, layout):
    """This rank's share; rank 0 sets up the run folder first, and waits for every worker (on a
    barrier without the process group's short timeout: workers finish at different times) before
    the report. Only the first rank of each copy writes."""
    import datetime

    import torch.distributed as dist

    from ..distributed import shutdown
    from .runner import check_run_dir, run
    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    try:
        if layout.is_main:
            check_run_dir(spec)
        dist.barrier(group=waiting)
        stats = run(spec, items, layout=layout)
        dist.barrier(group=waiting)
    finally:
        shutdown()
    return stats
