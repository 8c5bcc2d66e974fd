"""Where the time of one group pass and one vision chunk goes, on the Qwen2.5-VL-7B architecture
with random bf16 weights (no video, no pipeline): the pieces `bench gpu` times end to end.

    python -m adapttoken.bench.profile_gpu --out /tmp/profile          # CUDA
    python -m adapttoken.bench.profile_gpu --tiny --out /tmp/profile   # CPU smoke test

1. sdpa backends (flash, memory-efficient, cuDNN) on the shapes the product runs: the language
   model's causal attention over one 4096-frame group (64 slices x 220 tokens + prompt, 28 heads,
   4 KV heads, head dim 128; with enable_gqa and with K/V repeated), the vision tower's windows
   (64 patches, 16 heads, head dim 80) and its full-attention slices (880 patches).
2. One group pass (`adapter.forward` with the probe at layer 20), as the pipeline runs it (with the
   prefix key/value store) and without probe or store; transformers' eager RMSNorm/MLP vs the fused
   kernels (fused_text.py). One pass of each under torch.profiler: the top kernels by GPU time.
3. One vision chunk (32 slices at 308x560) through qwen_vision_fast: eager vs compiled, default vs
   cuDNN attention first; the top kernels of the compiled chunk.

Timings: CUDA events / synchronize, warm-up first, median of `--iters`. Writes profile.json and
kernels_*.txt under --out; prints a short table last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, iters=5, warmup=2) -> dict:
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "runs": ts}


def backends_ctx(name):
    """None: torch's default priority; otherwise that backend first (the others after it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name is None:
        return contextlib.nullcontext()
    order = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    first = order[name]
    rest = [b for b in order.values() if b != first]
    return sdpa_kernel([first, *rest], set_priority=True)


def only_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]])


def sdpa_bench(dev, dtype, tiny: bool, iters: int) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    L = 64 * 220 + 60 if not tiny else 256
    shapes = [
        # name, (B, H, Lq, d), Hkv, Lk, causal
        ("llm_causal_gqa", (1, 28, L, 128), 4, L, True),
        ("llm_causal_repeated_kv", (1, 28, L, 128), 28, L, True),
        ("vision_windows", (480 if not tiny else 8, 16, 64, 80), 16, 64, False),
        ("vision_full_slices", (32 if not tiny else 2, 16, 880, 80), 16, 880, False),
    ]
    out = []
    for name, (B, H, Lq, d), hkv, Lk, causal in shapes:
        q = torch.randn(B, H, Lq, d, generator=g).to(dev, dtype)
        k = torch.randn(B, hkv, Lk, d, generator=g).to(dev, dtype)
        v = torch.randn(B, hkv, Lk, d, generator=g).to(dev, dtype)
        flops = 4.0 * B * H * Lq * Lk * d * (0.5 if causal else 1.0)
        ref = None
        for be in ("flash", "efficient", "cudnn", "math"):
            if be == "math" and not tiny:
                continue
            row = {"shape": name, "backend": be, "q": [B, H, Lq, d], "kv_heads": hkv,
                   "causal": causal, "flops": flops}
            try:
                def run():
                    with only_backend(be):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                              enable_gqa=hkv != H)
                o = run()
                if ref is None:
                    ref = o.float()
                row["rel_err_vs_first"] = float((o.float() - ref).norm() / ref.norm())
                t = timed(run, dev, iters=iters)
                row.update(t, tflops=flops / t["median_s"] / 1e12)
            except Exception as e:  # noqa: BLE001 - a backend that refuses the shape
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            out.append(row)
            print(f"[profile] sdpa {name:24s} {be:9s} "
                  + (f"{row['median_s'] * 1e3:8.2f} ms {row['tflops']:6.0f} TFLOP/s"
                     if "median_s" in row else row.get("error", "")), flush=True)
        del q, k, v
    return out


def kernel_table(prof, n=25) -> str:
    return prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available()
                                     else "self_cpu_time_total", row_limit=n, max_name_column_width=90)


def kernel_parents(prof, n=30) -> str:
    """Which operator launched each GPU kernel, with the operator's input shapes (needs
    `record_shapes=True`): one line per (kernel, operator, shapes), longest total first. Finds
    the op behind an anonymous kernel (`elementwise_kernel<...>`) that `kernel_table` lists alone."""
    rows: dict = {}
    for e in prof.events():
        for k in getattr(e, "kernels", None) or ():
            key = (k.name[:70], e.name, str(getattr(e, "input_shapes", "") or "")[:120])
            n_calls, total = rows.get(key, (0, 0.0))
            rows[key] = (n_calls + 1, total + k.duration)
    lines = [f"{'total ms':>9} {'calls':>6}  kernel | operator | input shapes"]
    for (kname, op, shapes), (n_calls, total) in sorted(rows.items(), key=lambda r: -r[1][1])[:n]:
        lines.append(f"{total / 1e3:9.3f} {n_calls:6d}  {kname} | {op} | {shapes}")
    return "\n".join(lines) + "\n"


def group_inputs(ad, dev, dtype, slices: int, tiny: bool):
    """(prompt, embeds, coords, extent) of one synthetic group pass: `slices` slices of 11x20 visual
    tokens (2x4 with `tiny`), small random embeddings (seed 1), the benchmark's first question."""
    from ..question import Question
    from .gpu import Q1
    rows, cols = (11, 20) if not tiny else (2, 4)
    D = ad.model.config.text_config.hidden_size
    g = torch.Generator(device="cpu").manual_seed(1)
    embeds = (0.02 * torch.randn(slices * rows * cols, D, generator=g)).to(dev, dtype)
    s, r, c = torch.meshgrid(torch.arange(slices), torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([4 * s.reshape(-1), r.reshape(-1), c.reshape(-1)])
    extent = max(int(coords[0].max()), rows - 1, cols - 1)
    return ad.build_prompt(Question(Q1[0], Q1[1])), embeds, coords, extent


def group_pass_bench(model, dev, dtype, tiny, iters, out: Path) -> dict:
    from ..kv_cache import PrefixKVCache
    from .gpu_measure import LLMCounter

    ad = model.adapter
    prompt, embeds, coords, extent = group_inputs(ad, dev, dtype, 64 if not tiny else 8, tiny)
    layer = ad.default_layer
    n_tok = len(prompt.prefix_ids) + embeds.shape[0] + len(prompt.suffix_ids)
    res = {"tokens": n_tok, "probe_layer": layer}
    counter = LLMCounter(model)
    flops = counter.call_flops(n_tok, 0) + counter.probe_flops(n_tok, 0, len(prompt.suffix_ids) - 1)
    res["flops"] = flops
    keys = iter(range(10 ** 6))

    def with_store():
        store = PrefixKVCache()
        return ad.forward(prompt, embeds, coords, extent, probe_layer=layer,
                          prefix_cache=(store, next(keys)))

    cases = {
        "pipeline (probe + prefix store)": with_store,
        "no probe, no store": lambda: ad.forward(prompt, embeds, coords, extent),
    }
    for name, fn in cases.items():
        for fuse in (False, None):
            label = name + (" / eager norm+MLP" if fuse is False else " / fused norm+MLP")
            ad.fuse_text = fuse
            try:
                t = timed(fn, dev, iters=iters)
                res[label] = dict(t, tflops=flops / t["median_s"] / 1e12)
                print(f"[profile] group pass {label:58s} {t['median_s'] * 1e3:8.1f} ms "
                      f"{flops / t['median_s'] / 1e12:6.0f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                res[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"[profile] group pass {label}: {res[label]['error']}", flush=True)
    ad.fuse_text = False
    a = with_store()
    ad.fuse_text = None
    b = with_store()
    rel = lambda x, y: float((x.float() - y.float()).norm() / y.float().norm())  # noqa: E731
    k = min(220, b.scores.numel())
    top_a, top_b = set(a.scores.topk(k).indices.tolist()), set(b.scores.topk(k).indices.tolist())
    res["fused_vs_eager"] = {"logits_rel_l2": rel(b.logits, a.logits),
                             "scores_rel_l2": rel(b.scores, a.scores),
                             "top220_overlap": len(top_a & top_b) / k,
                             "argmax_equal": int(a.logits.argmax()) == int(b.logits.argmax())}
    print(f"[profile] fused vs eager: {res['fused_vs_eager']}", flush=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        with_store()
        _sync(dev)
        res["peak_extra_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 30
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for fuse, name in ((None, "kernels_group_pass_fused.txt"), (False, "kernels_group_pass.txt")):
        ad.fuse_text = fuse
        with profile(activities=acts, record_shapes=True) as prof:
            with_store()
            _sync(dev)
        (out / name).write_text(kernel_table(prof))
        (out / name.replace("kernels_", "kernel_parents_")).write_text(kernel_parents(prof))
    ad.fuse_text = None
    return res


def accuracy_check(model, dev, tiny, fp8: bool = False, fp8_skip=None) -> dict:
    """Group-pass logits and probe scores of eager bf16 and fused bf16 against a float32 eager
    reference (TF32 off) on the same inputs: is the fused path further from the truth than eager?
    fp8: then the model's linear layers are converted to float8 in place (models/fp8.py; the model
    stays so; `fp8_skip`: the name parts kept, default fp8.FP8_SKIP) and the fused fp8 pass is
    compared with the same reference."""
    ad = model.adapter
    # 16 slices = 3,520 visual tokens: float32 attention fits the card
    prompt, embeds, coords, extent = group_inputs(ad, dev, torch.bfloat16, 16 if not tiny else 8, tiny)
    layer = ad.default_layer
    runs = {}
    for name, fuse in (("eager_bf16", False), ("fused_bf16", None)):
        ad.fuse_text = fuse
        o = ad.forward(prompt, embeds, coords, extent, probe_layer=layer)
        runs[name] = (o.logits.float().cpu(), o.scores.float().cpu())
    ad.fuse_text = False
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ad.model.float()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            o = ad.forward(prompt, embeds.float(), coords, extent, probe_layer=layer)
        ref = (o.logits.float().cpu(), o.scores.float().cpu())
    finally:
        ad.model.to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ad.fuse_text = None
    if fp8:
        from ..models.fp8 import FP8_SKIP, convert
        convert(ad.model, skip=FP8_SKIP if fp8_skip is None else fp8_skip)
        o = ad.forward(prompt, embeds, coords, extent, probe_layer=layer)
        runs["fused_fp8"] = (o.logits.float().cpu(), o.scores.float().cpu())
    rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    k = min(220, ref[1].numel())
    top_ref = set(ref[1].topk(k).indices.tolist())
    res = {}
    for name, (lg, sc) in runs.items():
        res[name] = {"logits_rel_l2_vs_fp32": rel(lg, ref[0]), "scores_rel_l2_vs_fp32": rel(sc, ref[1]),
                     "top220_overlap_vs_fp32": len(set(sc.topk(k).indices.tolist()) & top_ref) / k}
        print(f"[profile] accuracy {name}: {res[name]}", flush=True)
    return res


def vision_bench(model, dev, dtype, tiny, iters, out: Path) -> dict:
    from ..models.qwen_vision_fast import count_flops, fast_video_features
    visual = model.adapter.model.model.visual
    vcfg = model.adapter.model.config.vision_config
    T, h, w = (32, 22, 40) if not tiny else (2, 4, 8)
    grid = torch.tensor([[T, h, w]], device=dev)
    in_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    g = torch.Generator(device="cpu").manual_seed(2)
    pv = torch.randn(T * h * w, in_dim, generator=g).to(dev, dtype)
    flops = float(count_flops(vcfg, grid.cpu())["total"])
    res = {"slices": T, "grid": [T, h, w], "flops": flops}
    t0 = time.perf_counter()
    fast_video_features(visual, pv, grid, compile=True)
    _sync(dev)
    res["first_compiled_call_s"] = time.perf_counter() - t0
    for comp in (False, True):
        for be in (None, "cudnn"):
            label = ("compiled" if comp else "eager") + (" / cuDNN attention first" if be else "")
            try:
                with backends_ctx(be):
                    t = timed(lambda: fast_video_features(visual, pv, grid, compile=comp), dev,
                              iters=iters)
                res[label] = dict(t, tflops=flops / t["median_s"] / 1e12)
                print(f"[profile] vision chunk {label:36s} {t['median_s'] * 1e3:8.1f} ms "
                      f"{flops / t['median_s'] / 1e12:6.0f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                res[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    # item 30 A/B: the compiled MLP with its gate/up biases in the matmuls (the module's forward)
    # against in the activation's kernel (the default); both against eager (rel. L2 of the features)
    from ..models import qwen_vision_fast as qvf
    ref = fast_video_features(visual, pv, grid, compile=False).float()
    rel = lambda y: float((y.float() - ref).norm() / ref.norm())  # noqa: E731
    res["mlp_bias"] = {}
    default = qvf._MLP_BIAS_IN_ACTIVATION
    try:
        for on in (False, True):
            qvf._MLP_BIAS_IN_ACTIVATION = on
            label = "in the activation (default)" if on else "in the matmuls (before)"
            t = timed(lambda: fast_video_features(visual, pv, grid, compile=True), dev, iters=iters)
            res["mlp_bias"][label] = dict(t, tflops=flops / t["median_s"] / 1e12,
                                          rel_l2_vs_eager=rel(fast_video_features(visual, pv, grid, compile=True)))
            print(f"[profile] vision chunk compiled, MLP bias {label:28s} {t['median_s'] * 1e3:8.1f} ms "
                  f"{flops / t['median_s'] / 1e12:6.0f} TFLOP/s  rel. L2 vs eager "
                  f"{res['mlp_bias'][label]['rel_l2_vs_eager']:.2e}", flush=True)
    finally:
        qvf._MLP_BIAS_IN_ACTIVATION = default
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        fast_video_features(visual, pv, grid, compile=True)
        _sync(dev)
    (out / "kernels_vision_compiled.txt").write_text(kernel_table(prof))
    (out / "kernel_parents_vision_compiled.txt").write_text(kernel_parents(prof))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapttoken.bench.profile_gpu",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/adapttoken_profile")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", nargs="+", default=["sdpa", "group_pass", "vision"],
                    choices=["sdpa", "group_pass", "vision", "accuracy"])
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers
    res = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    from .gpu_measure import build_model, matmul_rate
    res["matmul"] = matmul_rate(dev)
    print(f"[profile] {res['gpu']} matmul {res['matmul']['flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    if "sdpa" in args.parts:
        res["sdpa"] = sdpa_bench(dev, dtype, args.tiny, args.iters)
    if {"group_pass", "vision", "accuracy"} & set(args.parts):
        model, _ = build_model(args.tiny, dev, dtype, 308 * 560 if not args.tiny else 56 * 112)
        if "group_pass" in args.parts:
            res["group_pass"] = group_pass_bench(model, dev, dtype, args.tiny, args.iters, out)
        if "vision" in args.parts:
            res["vision"] = vision_bench(model, dev, dtype, args.tiny, args.iters, out)
        if "accuracy" in args.parts:
            res["accuracy"] = accuracy_check(model, dev, args.tiny)
    (out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"[profile] wrote {out / 'profile.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
