"""Command line: `python -m adapttoken ask VIDEO "QUESTION" [--option TEXT ...] ...`, `demo`,
`bench`, `eval`, `download`. Errors print one line naming the input, exit non-zero, no traceback unless
--debug."""
from __future__ import annotations

import argparse
import json
import sys

from .defaults import QUANTIZATION_CHOICES, default_model_dir
from .errors import InputError


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local model folder (default: $ADAPTTOKEN_MODEL or the bundled tiny model)")
    p.add_argument("--lite", action="store_true", help="AdaptToken-Lite: stop early when certain")
    p.add_argument("--method", choices=["adapttoken", "lite", "even_split", "uniform"], default=None,
                   help="selection method (default adapttoken; --lite means lite)")
    p.add_argument("--frames", type=int, default=None, help="frames sampled uniformly (default 1024)")
    p.add_argument("--max-fps", type=float, default=None, help="cap on the sampled frame rate")
    p.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    p.add_argument("--end", type=float, default=None, help="end time in seconds")
    p.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel cap (default 308*560)")
    p.add_argument("--budget", type=int, default=None, help="total visual tokens kept (default 7040)")
    p.add_argument("--group-size", type=int, default=None, help="temporal slices per group (default 64)")
    p.add_argument("--layout", choices=["strided", "contiguous"], default="strided")
    p.add_argument("--layer", type=int, default=None, help="reference layer of the attention probe")
    p.add_argument("--aggregation", choices=["max", "mean"], default="max")
    p.add_argument("--relevance", choices=["linear", "softmax", "even"], default="linear")
    p.add_argument("--redundancy", type=float, default=0.9,
                   help="cosine threshold for redundancy removal (negative value: off)")
    p.add_argument("--stop-threshold", type=float, default=0.2, help="Lite: stop when H/Hmax below this")
    p.add_argument("--stop-confirm", type=int, default=2,
                   help="Lite: confident groups that must agree on the answer before it stops "
                        "(1: the paper's first confident group)")
    p.add_argument("--no-stop-check", dest="stop_check_answer", action="store_false",
                   help="Lite: stop on the confident groups alone, without checking that the answer "
                        "over the tokens chosen so far agrees (entropy.StopRule.check_answer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: one process spreads the model's layers over every GPU it sees "
                        "(then the host's memory) through accelerate: for models larger than one GPU "
                        "without torchrun")
    p.add_argument("--tp", type=int, default=1,
                   help="under torchrun: tensor parallel over this many processes (transformers' "
                        "own plan; each GPU holds 1/N of every layer); must equal --nproc-per-node. "
                        "1 (default): each process holds a whole copy and the groups are divided")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="none",
                   help="language-model weights in 4-bit NF4 or 8-bit (bitsandbytes: pip install "
                        "\"adapttoken[quant]\"), computed in --dtype; the vision tower and LM head "
                        "stay in --dtype. fp8: float8 weights and matmuls for the language model "
                        "and the vision tower (GPUs with FP8: H100/H200, L4/L40, RTX 40xx; "
                        "torch only). Default none")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa default)")
    p.add_argument("--cache-dir", default=None,
                   help="on-disk vision-feature cache folder: a later run on the same video and "
                        "sampling skips decoding and the vision tower")
    p.add_argument("--feature-device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="where vision features are kept (auto: GPU up to 20%% of its memory, else CPU memory)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="video decoding threads (default: half the cores, 1-8; 0: no threads)")
    p.add_argument("--nvdec", action="store_true",
                   help="decode on the GPU's video engines (NVDEC) where it takes the file: PyAV with "
                        "a model on CUDA; frames are the same bit for bit (default: CPU threads)")
    p.add_argument("--backend", choices=["auto", "decord", "pyav"], default="auto",
                   help="video decoder (auto: decord when installed and it agrees with the file, "
                        "else PyAV)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m adapttoken",
                                 description="AdaptToken: answer questions about long videos.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ask", help="answer a question about a video")
    a.add_argument("video", help="a video file, or a folder of videos with --questions")
    a.add_argument("question", nargs="?", default=None,
                   help="the question (leave out with --questions)")
    a.add_argument("--questions", default=None,
                   help="a JSONL file of questions, one {\"question\", \"options\": [...], \"id\"} "
                        "a line: all answered on the video (or on every video of the folder) in one "
                        "run, reusing its features")
    a.add_argument("--evidence", action="store_true",
                   help="also print the key moments (times and frames the selection leans on; "
                        "always in --json as `evidence`)")
    a.add_argument("--option", action="append", default=[],
                   help="an answer option (repeat: A, B, C... in order)")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_method_args(a)
    d = sub.add_parser("demo", help="generate a long synthetic video and run AdaptToken and Lite "
                                    "with the bundled model")
    d.add_argument("--frames", type=int, default=2048)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="adapttoken_demo", help="folder for the video and preview")
    d.add_argument("--model", default=None)
    d.add_argument("--debug", action="store_true")
    e = sub.add_parser("eval", help="run VideoMME / MLVU / LongVideoBench / LVBench / a JSONL "
                                    "(resumable); `eval score OUT` re-scores a run; `eval make-synthetic` "
                                    "writes a synthetic set for speed runs",
                       add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="benchmarks: synthetic (accuracy), gpu (speed), rss (peak "
                                     "host memory against the number of sampled frames) or decode "
                                     "(decoder lanes' frames per second, CPU and NVDEC)")
    b.add_argument("which", choices=["synthetic", "gpu", "rss", "decode"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    dl = sub.add_parser("download", help="explicitly download a model's safetensors from the hub")
    dl.add_argument("repo_id")
    dl.add_argument("dest")
    return ap


def config_from_args(args):
    from .pipeline import AdaptTokenConfig
    c = AdaptTokenConfig()
    if args.frames is not None:
        c.num_frames = args.frames
    if args.max_pixels is not None:
        c.max_pixels = args.max_pixels
    if args.budget is not None:
        c.budget = args.budget
    if args.group_size is not None:
        c.group_size = args.group_size
    c.max_fps, c.start, c.end = args.max_fps, args.start, args.end
    c.layout, c.layer, c.aggregation, c.relevance = args.layout, args.layer, args.aggregation, args.relevance
    c.redundancy_threshold = None if args.redundancy < 0 else args.redundancy
    c.stop_threshold, c.max_new_tokens = args.stop_threshold, args.max_new_tokens
    c.stop_confirm = args.stop_confirm
    c.stop_check_answer = getattr(args, "stop_check_answer", True)
    c.do_sample, c.temperature, c.seed = args.sample, args.temperature, args.seed
    c.cache_dir = getattr(args, "cache_dir", None)
    c.feature_device = getattr(args, "feature_device", "auto")
    c.decode_workers = getattr(args, "decode_workers", None)
    c.hw_decode = bool(getattr(args, "nvdec", False))
    c.video_backend = getattr(args, "backend", "auto")
    return c


def _print_evidence(res) -> None:
    print("key moments (best first):")
    for m in res.evidence:
        g = "" if m["group"] is None else f", group {m['group']}"
        print(f"  {m['time']:9.2f} s  frame {m['frame']:7d}{g}: score {m['score']:.4f}, "
              f"{m['tokens']} tokens")


def _print_result(res, as_json: bool, evidence: bool = False) -> None:
    if as_json:
        print(res.to_json())
        return
    print(f"answer: {res.answer}")
    if res.option_probs:
        print("options: " + "  ".join(f"{k}={v:.3f}" for k, v in res.option_probs.items()))
    print(f"method: {res.method}   frames: {res.num_frames}   kept tokens: {len(res.kept_tokens)}"
          f" / budget {res.budget}   group passes: {res.group_passes}")
    for g in res.groups:
        if g.entropy is None:
            continue
        print(f"  group {g.group:3d}: entropy {g.entropy:.3f} ({g.entropy_norm:.2f} of max)  "
              f"relevance {g.relevance:.3f}  budget {g.budget:5d}  kept {g.kept:5d}")
    if res.skipped_groups:
        print(f"  skipped groups (Lite): {res.skipped_groups}")
    print("seconds: " + "  ".join(f"{k}={v:.2f}" for k, v in res.seconds.items()))
    if evidence:
        _print_evidence(res)


def _videos_of(path: str) -> list[str]:
    from pathlib import Path
    p = Path(path)
    if p.is_dir():
        vids = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        if not vids:
            raise InputError(f"folder {path!r} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
        return vids
    return [path]


def cmd_ask_many(args) -> int:
    """--questions: every question on every video, one model, features reused per video."""
    import time

    from .models.loading import load_model
    from .pipeline import ask, read_questions
    from .video import plan_sampling, probe_video
    items = read_questions(args.questions)
    if args.option:
        raise InputError("--option applies to one question; with --questions put \"options\" in "
                         "each line of the file")
    cfg = config_from_args(args)
    videos = _videos_of(args.video)
    for v in videos:                                  # every video checked before the model loads
        plan_sampling(probe_video(v), num_frames=cfg.num_frames, max_fps=cfg.max_fps,
                      start=cfg.start, end=cfg.end, max_pixels=cfg.max_pixels,
                      min_pixels=cfg.min_pixels, multiple_of=1)
    method = args.method or ("lite" if args.lite else "adapttoken")
    if args.tp != 1:
        raise InputError("--tp applies to one question under torchrun: leave it out with --questions")
    model = load_model(args.model or default_model_dir(), dtype=args.dtype, device=args.device,
                       attn_implementation=args.attn, device_map=args.device_map,
                       quantization=args.quantization)
    rows = []
    for v in videos:
        for i, (qid, q) in enumerate(items):
            t0 = time.perf_counter()
            res = ask(model, v, q, config=cfg, method=method)
            wall = time.perf_counter() - t0
            row = {"video": v, "id": qid, "question": q.text, "options": list(q.options),
                   "answer": res.answer, "option_probs": res.option_probs, "seconds": round(wall, 4),
                   "first_on_video": i == 0, "evidence": res.evidence,
                   "group_passes": res.group_passes, "kept": len(res.kept_tokens),
                   "decoded_frames": res.decoded_frames, "encoded_slices": res.encoded_slices}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{v}  [{qid}]  {res.answer!r}  {wall:.2f} s", flush=True)
                if args.evidence:
                    _print_evidence(res)
        model.clear_cache()                           # one video's features at a time
    first = [r["seconds"] for r in rows if r["first_on_video"]]
    later = [r["seconds"] for r in rows if not r["first_on_video"]]
    if not args.json and later:
        f, l = sum(first) / len(first), sum(later) / len(later)
        print(f"first question per video: {f:.2f} s; later questions: {l:.2f} s on average "
              f"({l / f:.2f}x the first)")
    return 0


VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")


def cmd_ask(args) -> int:
    if args.questions is not None:
        if args.question is not None:
            raise InputError("give either a question or --questions FILE, not both")
        return cmd_ask_many(args)
    if args.question is None:
        raise InputError("no question: give it after the video, or --questions FILE.jsonl")
    from .models.loading import load_model
    from .pipeline import ask
    from .question import Question
    from .video import plan_sampling, probe_video
    q = Question(args.question, tuple(args.option))
    cfg = config_from_args(args)
    if cfg.budget <= 0:
        raise InputError(f"--budget {cfg.budget} must be a positive number of tokens: give 1 or more "
                         f"(default 7040; more than the video has keeps all of them)")
    # the video and its range are checked before the model loads (the probe is cached for ask)
    plan_sampling(probe_video(args.video), num_frames=cfg.num_frames, max_fps=cfg.max_fps,
                  start=cfg.start, end=cfg.end, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                  multiple_of=1)
    # one question per process: group prefixes' keys/values kept for a later question (up to
    # 2 GiB on the CPU, ~2 KiB per visual token with the bundled model; on a GPU up to 3/4 of its
    # memory: 3.0 GiB of a 16 GB card's peak at 4096 frames of the 7B) would never be used; the
    # group passes run the same calls either way, so results are unchanged
    cfg.prefix_cpu_bytes = 0
    cfg.prefix_keep = False
    method = args.method or ("lite" if args.lite else "adapttoken")
    layout = _distributed_layout(args)
    try:
        model = load_model(args.model or default_model_dir(), dtype=args.dtype,
                           device=layout.device if layout is not None else args.device,
                           attn_implementation=args.attn, device_map=args.device_map,
                           layout=layout if layout is not None and layout.tp > 1 else None,
                           quantization=args.quantization)
        res = ask(model, args.video, q, config=cfg, method=method, layout=layout)
        if layout is None or layout.is_main:        # under torchrun rank 0 alone prints
            _print_result(res, args.json, args.evidence)
    finally:
        if layout is not None:
            from .distributed import shutdown
            shutdown()
    return 0


def _distributed_layout(args):
    """The rank's Layout when torchrun started this process (None otherwise)."""
    from .distributed import init, launched_by_torchrun
    if not launched_by_torchrun():
        if args.tp != 1:
            raise InputError(f"--tp {args.tp} runs under torchrun: torchrun --nproc-per-node "
                             f"{args.tp} -m adapttoken ask ... --tp {args.tp}")
        return None
    if args.device_map:
        raise InputError("--device-map auto is the one-process way to spread a model over GPUs: "
                         "under torchrun use --tp N instead")
    return init(tp=args.tp, device=args.device)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and any(a in ("-h", "--help") for a in argv[1:2]):
        from .eval.command import main as eval_main       # `eval --help`: eval's own options
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or "--debug" in argv
    try:
        if args.cmd == "ask":
            return cmd_ask(args)
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(args)
        if args.cmd == "eval":
            from .eval.command import main as eval_main
            return eval_main(args.rest)
        if args.cmd == "bench":
            if args.which == "synthetic":
                from .bench.synthetic import main as bench_main
            elif args.which == "rss":
                from .bench.rss import main as bench_main
            elif args.which == "decode":
                from .bench.decode import main as bench_main
            else:
                from .bench.gpu import main as bench_main
            return bench_main(args.rest)
        if args.cmd == "download":
            from .models.loading import download_model
            print(download_model(args.repo_id, args.dest))
            return 0
    except KeyboardInterrupt:
        print("adapttoken: cancelled", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line for users, traceback with --debug
        from .errors import AdaptTokenError
        if debug:
            raise
        import os
        where = f" (rank {os.environ['RANK']})" if "WORLD_SIZE" in os.environ and "RANK" in os.environ else ""
        if isinstance(e, AdaptTokenError):
            print(f"adapttoken{where}: error: {e}", file=sys.stderr)
            return 2
        print(f"adapttoken{where}: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1
    return 0
