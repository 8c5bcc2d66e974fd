"""Micro-benchmark: Qwen2.5-VL vision tower, transformers' sdpa path vs adapttoken's fast path.

    python -m adapttoken.bench.vision --frames 128 --size 448 --device cuda --out vision.json
    python -m adapttoken.bench.vision --tiny --device cpu --frames 4 --size 252x308   # smoke test

Builds the Qwen2.5-VL-7B vision config (depth 32, hidden 1280, 16 heads, MLP 3420, out 3584,
window 112, full attention at blocks 7/15/23/31) with random weights (no download), in bf16 on the
device, and times in one run: transformers' own forward (``attn_implementation="sdpa"``, which loops
over windows in Python), ``fast_video_features`` eager, and (``--compile``, default on CUDA) with
``torch.compile`` on the per-block code around the attention. Median of ``--iters`` timed runs
after ``--warmup`` runs, each bracketed by device synchronisation. FLOPs count the matmuls (patch embed, qkv, proj, MLP, merger)
and attention (QK^T and PV) at 2 FLOPs per multiply-add. Unless ``--no-check``, it also compares
transformers and the eager fast path in float32 on a small ragged two-video input (TF32 off).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from adapttoken.models.qwen_vision_fast import count_flops, fast_video_features, is_supported
except Exception:  # the package's other modules may need what a bare machine lacks: load by path
    import importlib.util

    _p = Path(__file__).resolve().parents[1] / "models" / "qwen_vision_fast.py"
    _spec = importlib.util.spec_from_file_location("qwen_vision_fast", _p)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["qwen_vision_fast"] = _mod
    _spec.loader.exec_module(_mod)
    count_flops, fast_video_features, is_supported = (_mod.count_flops, _mod.fast_video_features,
                                                      _mod.is_supported)

SEVEN_B = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
               window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14,
               temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="silu",
               tokens_per_second=2)
TINY = dict(SEVEN_B, depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48,
            fullatt_block_indexes=[1, 3])


def build_tower(spec: dict, device, dtype, seed=0):
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLVisionConfig(**spec, attn_implementation="sdpa")
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vis = Qwen2_5_VisionTransformerPretrainedModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    vis.config._attn_implementation = "sdpa"
    return vis.eval().requires_grad_(False)


def parse_size(s: str) -> tuple[int, int]:
    h, _, w = s.lower().partition("x")
    return int(h), int(w or h)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def diff(a, b):
    a, b = a.float(), b.float()
    d = (a - b).abs()
    ref = b.abs().max().item()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "ref_max_abs": ref,
            "max_rel_to_ref_max": d.max().item() / max(ref, 1e-30)}


def hf_features(vis, pv, grid):
    # what get_video_features runs (before splitting the pooler output per video)
    return vis(pv.type(vis.dtype), grid_thw=grid).pooler_output


def run_shape(vis, cfg, frames, hw, device, args, variants):
    h, w = hw
    pt = cfg.patch_size
    if h % (pt * cfg.spatial_merge_size) or w % (pt * cfg.spatial_merge_size) or frames % 2:
        raise SystemExit(f"size {h}x{w} must be a multiple of 28 and frames even")
    grid = torch.tensor([[frames // cfg.temporal_patch_size, h // pt, w // pt]], device=device)
    n = int(grid.prod())
    g = torch.Generator(device="cpu").manual_seed(1)
    pv = torch.randn(n, cfg.in_channels * cfg.temporal_patch_size * pt * pt, generator=g).to(device, vis.dtype)
    flops = count_flops(cfg, grid.cpu())
    res = {"frames": frames, "height": h, "width": w, "grid_thw": grid.tolist(), "patches": n,
           "merged_tokens": n // cfg.spatial_merge_size ** 2, "flops": flops, "paths": {}}
    outs = {}
    for name, fn in variants:
        entry = {}
        try:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn(vis, pv, grid)
            sync(device)
            entry["first_call_s"] = time.perf_counter() - t0
            times = time_ms(lambda: fn(vis, pv, grid), device, args.warmup, args.iters)
            med = statistics.median(times)
            entry.update(ms_median=med, ms_all=times, tflops=flops["total"] / med / 1e9)
            if torch.device(device).type == "cuda":
                entry["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            outs[name] = out
        except Exception as e:  # keep the other numbers when one path fails (e.g. compile)
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["paths"][name] = entry
    # the patch embedding alone: the module's Conv3d vs its weight as one matmul
    wt = vis.patch_embed.proj.weight
    with torch.no_grad():
        conv = time_ms(lambda: vis.patch_embed(pv), device, 1, args.iters)
        mm = time_ms(lambda: torch.nn.functional.linear(pv, wt.reshape(wt.shape[0], -1)), device, 1, args.iters)
    res["patch_embed_ms"] = {"conv3d": statistics.median(conv), "matmul": statistics.median(mm)}
    base = res["paths"].get("hf_sdpa", {}).get("ms_median")
    for name, entry in res["paths"].items():
        if base and "ms_median" in entry:
            entry["speedup_vs_hf"] = base / entry["ms_median"]
        if name != "hf_sdpa" and name in outs and "hf_sdpa" in outs:
            entry["diff_vs_hf"] = diff(outs[name], outs["hf_sdpa"])
    return res


def profile(vis, cfg, frames, hw, device, variants, rows=14):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    h, w = hw
    pt = cfg.patch_size
    grid = torch.tensor([[frames // cfg.temporal_patch_size, h // pt, w // pt]], device=device)
    pv = torch.randn(int(grid.prod()), cfg.in_channels * cfg.temporal_patch_size * pt * pt).to(device, vis.dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, fn in variants:
        try:
            fn(vis, pv, grid)
            sync(device)
            with prof(activities=acts) as p:
                fn(vis, pv, grid)
                sync(device)
            tables[name] = p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
            print(f"\nprofile {name} {h}x{w}:\n{tables[name]}")
        except Exception as e:
            tables[name] = f"failed: {type(e).__name__}: {e}"
    return tables


def fp32_check(vis, cfg, device):
    """Both paths in float32 on two videos with ragged window tilings (TF32 off)."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        vis.float()
        pt = cfg.patch_size
        grid = torch.tensor([[2, 252 // pt, 308 // pt], [3, 448 // pt, 448 // pt]], device=device)
        n = int(grid.prod(-1).sum())
        g = torch.Generator(device="cpu").manual_seed(2)
        pv = torch.randn(n, cfg.in_channels * cfg.temporal_patch_size * pt * pt, generator=g).to(device)
        with torch.no_grad():
            ref = hf_features(vis, pv, grid)
        out = fast_video_features(vis, pv, grid, compile=False)
        return {"grid_thw": grid.tolist(), **diff(out, ref)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--size", default="448", help="HxW or S (square); comma-separated for several")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random config (CPU smoke test)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="also time the fast path with torch.compile (default: on for CUDA)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the float32 check")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="print the top kernels of one fast-path forward (torch.profiler)")
    args = ap.parse_args(argv)

    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    use_compile = args.compile if args.compile is not None else torch.device(device).type == "cuda"
    vis = build_tower(TINY if args.tiny else SEVEN_B, device, dtype)
    cfg = vis.config
    assert is_supported(vis), "the tower built here is not recognised by is_supported()"

    def hf(v, pv, g):
        with torch.no_grad():
            return hf_features(v, pv, g)

    variants = [("hf_sdpa", hf), ("fast_eager", lambda v, pv, g: fast_video_features(v, pv, g, compile=False))]
    if use_compile:
        variants.append(("fast_compiled", lambda v, pv, g: fast_video_features(v, pv, g, compile=True)))

    import transformers
    meta = {"device": device, "dtype": args.dtype, "tiny": args.tiny, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "config": {k: getattr(cfg, k) for k in SEVEN_B}, "iters": args.iters, "warmup": args.warmup}
    if torch.device(device).type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    results = {"meta": meta, "shapes": []}
    for s in args.size.split(","):
        r = run_shape(vis, cfg, args.frames, parse_size(s), device, args, variants)
        results["shapes"].append(r)
        print(f"\n{args.frames} frames {r['height']}x{r['width']}: {r['patches']} patches, "
              f"{r['flops']['total'] / 1e12:.2f} TFLOP per forward "
              f"(attention {r['flops']['attention'] / 1e12:.2f})")
        pe = r["patch_embed_ms"]
        print(f"  patch embed alone: Conv3d {pe['conv3d']:.2f} ms, as a matmul {pe['matmul']:.2f} ms")
        for name, e in r["paths"].items():
            if "error" in e:
                print(f"  {name:14s} FAILED: {e['error'][:300]}")
                continue
            line = (f"  {name:14s} {e['ms_median']:9.1f} ms  {e['tflops']:7.1f} TFLOP/s"
                    f"  first call {e['first_call_s']:.1f} s")
            if "speedup_vs_hf" in e:
                line += f"  speedup {e['speedup_vs_hf']:.2f}x"
            if "diff_vs_hf" in e:
                d = e["diff_vs_hf"]
                line += f"  max|diff| {d['max_abs']:.3g} (ref max {d['ref_max_abs']:.3g})"
            if "peak_mem_gib" in e:
                line += f"  peak {e['peak_mem_gib']:.1f} GiB"
            print(line, flush=True)
        if args.out:  # keep what is done if a later shape runs out of time
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
        if args.profile:
            results.setdefault("profile", {})[f"{r['height']}x{r['width']}"] = profile(
                vis, cfg, args.frames, (r["height"], r["width"]), device,
                [v for v in variants if v[0] in ("fast_eager", "fast_compiled")])
    if use_compile:  # a third frame count: the dynamic-shape graphs should serve it without compiling
        h, w = parse_size(args.size.split(",")[0])
        frames = max(2, args.frames // 2)
        grid = torch.tensor([[frames // cfg.temporal_patch_size, h // cfg.patch_size, w // cfg.patch_size]],
                            device=device)
        pv = torch.randn(int(grid.prod()), cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2,
                         device=device, dtype=vis.dtype)
        t0 = time.perf_counter()
        fast_video_features(vis, pv, grid, compile=True)
        sync(device)
        first = time.perf_counter() - t0
        ms = statistics.median(time_ms(lambda: fast_video_features(vis, pv, grid, compile=True), device, 1, 3))
        results["compiled_new_frame_count"] = {"frames": frames, "first_call_s": first, "ms_median": ms}
        print(f"\ncompiled path, new frame count {frames}: first call {first:.2f} s, then {ms:.1f} ms")
    try:
        from torch._dynamo.utils import counters
        meta["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "frames", "recompiles")}
    except Exception:
        pass
    if args.check:
        results["fp32_check"] = fp32_check(vis, cfg, device)
        c = results["fp32_check"]
        print(f"\nfloat32 check {c['grid_thw']}: max|fast - hf| {c['max_abs']:.3g} "
              f"(ref max {c['ref_max_abs']:.3g})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
