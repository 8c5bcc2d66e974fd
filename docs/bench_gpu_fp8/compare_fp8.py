"""FP8 (quantization="fp8", adapttoken/models/fp8.py) against bf16: agreement where it means something.

    python docs/bench_gpu_fp8/compare_fp8.py --out OUT            # both parts (a GPU with FP8)
    python docs/bench_gpu_fp8/compare_fp8.py --device cpu --tiny --videos 2 --frames 256   # smoke test

Part 1, the bundled model (trained): the demo's colour-needle task on --videos synthetic videos of
--frames frames (seeds from 10,000 on, never used in training), frames in memory, AdaptToken with the
demo's settings; the model loaded in bf16, then loaded again with quantization="fp8". Per video: the
answer of each, the overlap of the kept tokens (|A & B| / |A|, A bf16's) and |delta H/H_max| per group.

Part 2, the Qwen2.5-VL-7B architecture with random weights (H/H_max ~ 1 everywhere there, so the
entropy says little): one group pass (3,520 visual tokens) in eager bf16, fused bf16 and fused fp8
against a float32 reference (TF32 off) on the same inputs: the probe's top-220 overlap with the
reference (bench/profile_gpu.accuracy_check).

Speed is measured by `python -m adapttoken bench gpu --quantization fp8` (the README's table).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "bench_gpu_quant"))

from compare import agreement, bundled_video, run_bundled  # noqa: E402


def part_bundled(args, dev) -> dict:
    import adapttoken as at
    from adapttoken.defaults import BUNDLED_MODEL
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    seeds = list(range(10_000, 10_000 + args.videos))
    videos = [bundled_video(args.frames, s) for s in seeds]
    runs = {}
    for name in ("reference", "fp8"):
        if name == "fp8" and args.bundled_variant != "all":
            from adapttoken.models.fp8 import FP8_SKIP, convert
            m = at.load_model(BUNDLED_MODEL, dtype=dtype, device=dev)
            convert(m.adapter.model, skip=FP8_SKIP + VARIANTS[args.bundled_variant])
        else:
            m = at.load_model(BUNDLED_MODEL, dtype=dtype, device=dev,
                              quantization="fp8" if name == "fp8" else None)
        run_bundled(m, videos[0][0], videos[0][1], args.frames, dev)          # warm-up
        runs[name] = [run_bundled(m, v, q, args.frames, dev) for v, q, _ in videos]
        del m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    per = []
    for seed, (v, q, _), a, b in zip(seeds, videos, runs["reference"], runs["fp8"]):
        ag = agreement(a, b)
        per.append({"seed": seed, "correct_answer": q.answer, "answer_ref": a["answer"],
                    "answer_fp8": b["answer"], "same_answer": a["answer"] == b["answer"],
                    "wall_ref_s": a["wall_s"], "wall_fp8_s": b["wall_s"], **ag})
        print(f"[bundled] seed {seed}: {a['answer']!r} / {b['answer']!r} (truth {q.answer})  "
              f"overlap {ag['overlap']:.3f}  dH max {ag['dH_max']:.4f}", flush=True)
    n = len(per)
    return {"frames": args.frames, "videos": n, "reference_dtype": dtype, "per_video": per,
            "variant": args.bundled_variant,
            "same_answers": sum(p["same_answer"] for p in per),
            "correct_ref": sum(p["answer_ref"].strip()[:1] == p["correct_answer"] for p in per),
            "correct_fp8": sum(p["answer_fp8"].strip()[:1] == p["correct_answer"] for p in per),
            "overlap_min": min(p["overlap"] for p in per),
            "overlap_mean": sum(p["overlap"] for p in per) / n,
            "dH_max": max(p["dH_max"] for p in per),
            "dH_mean": sum(p["dH_mean"] for p in per) / n}


# which linear layers stay in bf16, beyond fp8.FP8_SKIP (LM head, mergers/projectors)
VARIANTS = {
    "all": (),
    "down_proj kept": ("down_proj",),
    "attention projections kept": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "MLP kept (attention projections in fp8)": ("gate_proj", "up_proj", "down_proj"),
}


def _group_pass_timer(model, dev, tiny):
    """Seconds of one group pass as the product runs it (64 slices of 11x20 tokens + the prompt,
    the probe on), median of 3 after 2 warm-ups (the first compiles)."""
    from adapttoken.bench.profile_gpu import group_inputs, timed
    ad = model.adapter
    prompt, embeds, coords, extent = group_inputs(ad, dev, ad.dtype, 64 if not tiny else 8, tiny)
    ad.fuse_text = None
    t = timed(lambda: ad.forward(prompt, embeds, coords, extent, probe_layer=ad.default_layer),
              dev, iters=3, warmup=2)
    return round(t["median_s"], 4)


def part_7b(args, dev) -> dict:
    from adapttoken.bench.gpu_measure import build_model
    from adapttoken.bench.profile_gpu import accuracy_check
    from adapttoken.models.fp8 import FP8_SKIP
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict = {"variants": {}}
    k = "top220_overlap_vs_fp32"
    for i, name in enumerate(args.variants):
        model, secs = build_model(args.tiny, dev, dt, 308 * 560)        # the same weights (seed 0)
        if i == 0:
            out["group_pass_s_bf16"] = _group_pass_timer(model, dev, args.tiny)
        res = accuracy_check(model, dev, args.tiny, fp8=True, fp8_skip=FP8_SKIP + VARIANTS[name])
        res["group_pass_s_fp8"] = _group_pass_timer(model, dev, args.tiny)
        res["fp8_minus_bf16_top220"] = res["fused_fp8"][k] - res["fused_bf16"][k]
        out["variants"][name] = res
        print(f"[7b] {name}: fp8 top220 {res['fused_fp8'][k]:.3f} (bf16 {res['fused_bf16'][k]:.3f}), "
              f"group pass {res['group_pass_s_fp8']:.3f} s (bf16 {out['group_pass_s_bf16']:.3f} s)",
              flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_gpu_fp8_out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true", help="part 2 on the tiny random config")
    ap.add_argument("--skip-bundled", action="store_true")
    ap.add_argument("--bundled-variant", default="all", choices=list(VARIANTS),
                    help="part 1: which linear layers stay in the load dtype (default: the library's)")
    ap.add_argument("--variants", nargs="+", default=["all"], choices=list(VARIANTS),
                    help="part 2: which linear layers stay in bf16 (each variant rebuilt from the same weights)")
    ap.add_argument("--skip-7b", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    import transformers
    res = {"meta": {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(),
                    "command": "python docs/bench_gpu_fp8/compare_fp8.py "
                               + " ".join(sys.argv[1:] if argv is None else argv)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_bundled:
        res["bundled"] = part_bundled(args, dev)
        print(f"[bundled] summary: " + json.dumps({k: v for k, v in res["bundled"].items()
                                                  if k != "per_video"}), flush=True)
        (out / "compare_fp8.json").write_text(json.dumps(res, indent=1, default=str))
    if not args.skip_7b:
        res["qwen2_5_vl_7b_random"] = part_7b(args, dev)
    res["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "compare_fp8.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
