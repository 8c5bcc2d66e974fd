"""Quantized weights against the unquantized model: memory, speed and agreement of the selection.

    python docs/bench_gpu_quant/compare.py --out OUT                 # both parts (CUDA)
    python docs/bench_gpu_quant/compare.py --skip-7b --device cpu    # the bundled model only

Part 1 (--skip-7b leaves it out): the Qwen2.5-VL-7B architecture with random weights (bench gpu's
build_model), frames held in memory (`bench gpu --in-memory`: no video file, no PyAV), AdaptToken at
--frames. The bf16 model runs first (no memory cap); the same weights are then quantized in memory
(nf4, transformers' quantizing load over the state dict) and the bf16 copy dropped; the nf4 model
runs under a --card-gib cap (torch.cuda.set_per_process_memory_fraction: allocations beyond it
fail, and the library sizes its GPU caches to it). Per run: peak GPU memory
(max_memory_allocated, reset per case), wall seconds, kept tokens; then the overlap of the kept
tokens and |delta H/H_max| per group. Random weights are never confident (H/H_max ~ 1 everywhere),
so the entropy agreement of part 1 says little; part 2 is where it means something.

Part 2: the bundled model (adapttoken-tiny-synth) on the demo's synthetic needle video (frames in
memory), AdaptToken at 2048 frames, the reference in the load dtype (bf16 on CUDA, fp32 on the CPU)
against nf4 and int8 as the library loads them (load_model(..., quantization=...)), and nf4
variants that keep more or fewer modules unquantized (which modules to skip: models/quant.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def agreement(ref, other) -> dict:
    """Kept-token overlap |A & B| / |A| (A the reference's kept tokens) and Jaccard, and per group
    |H/H_max - H'/H_max'| (mean, max) over the groups both ran."""
    a, b = ref["kept_set"], other["kept_set"]
    n = len(ref["entropy_norm"])
    dh = [abs(x - y) for x, y in zip(ref["entropy_norm"], other["entropy_norm"])
          if x is not None and y is not None]
    return {"kept_ref": len(a), "kept": len(b), "overlap": len(a & b) / max(1, len(a)),
            "jaccard": len(a & b) / max(1, len(a | b)), "groups": n,
            "dH_mean": sum(dh) / max(1, len(dh)), "dH_max": max(dh, default=0.0)}


def _peak(dev) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else 0.0


def _reset(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


# ----------------------------------------------------------------------------------------------
# part 1: 7B random weights


def part_7b(args, dev) -> dict:
    from adapttoken.bench.gpu import Case, make_memory_video, run_case
    from adapttoken.bench.gpu_measure import LLMCounter, build_model, vision_flops_per_slice
    from adapttoken.models.loading import Model
    from adapttoken.models.qwen2_5_vl import Qwen25VLAdapter
    from adapttoken.models.quant import quantize_in_memory

    H, W = 308, 560
    bargs = SimpleNamespace(pixels=H * W, feature_device="auto", decode_workers=None, no_overlap=False,
                            compile_vision=None, kv_host_gib=0.0, budget=args.budget,
                            group_size=args.group_size, lite_stop_fraction=0.25,
                            max_new_tokens=4)
    video, vmeta = make_memory_video(args.frames, (H, W))
    print(f"[7b] {args.frames} frames in memory, {vmeta['bytes'] / 2 ** 30:.2f} GiB, "
          f"{vmeta['seconds_to_make']:.1f} s", flush=True)
    out: dict = {"frames": args.frames, "budget": args.budget, "group_size": args.group_size,
                 "card_gib": args.card_gib, "runs": {}}

    cuda = dev.type == "cuda"

    def cap(gib):
        if cuda:
            total = torch.cuda.get_device_properties(dev).total_memory
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2 ** 30 / total) if gib else 1.0, idx)

    def allocated() -> float:
        return round(torch.cuda.memory_allocated(dev) / 2 ** 30, 3) if cuda else 0.0

    def run(model, label, cap_gib=None, no_prefix_kv=False, fuse_text=None):
        cap(cap_gib)
        bargs.no_prefix_kv = no_prefix_kv
        model.adapter.fuse_text = fuse_text
        res_hw = model.adapter.resized_size(H, W, bargs.pixels, bargs.pixels)
        vis = vision_flops_per_slice(model, res_hw)
        counter = LLMCounter(model)
        with counter:
            t0 = time.perf_counter()
            run_case(model, video, 4 * args.group_size, "adapttoken", bargs, counter, vis)   # warm-up
            warm = time.perf_counter() - t0
            cases = []
            for _ in range(args.repeat):
                c: Case = run_case(model, video, args.frames, "adapttoken", bargs, counter, vis)
                cases.append(c)
                print(f"[7b] {label}: wall {c.wall:.2f} s  peak {c.peak_gib:.2f} GiB  kept {c.kept}  "
                      f"vision {c.seconds.get('vision', 0):.2f}  group_pass {c.seconds.get('group_pass', 0):.2f}",
                      flush=True)
        model.clear_cache()
        cap(None)
        c = cases[-1]
        weights = sum(t.numel() * t.element_size() for t in model.adapter.model.parameters())
        return {"wall_s": [round(x.wall, 3) for x in cases], "peak_gib": round(max(x.peak_gib for x in cases), 3),
                "warmup_s": round(warm, 2), "seconds": {k: round(v, 3) for k, v in c.seconds.items()},
                "kept": c.kept, "group_passes": c.group_passes, "groups": c.groups,
                "param_gib": round(weights / 2 ** 30, 3), "features": c.features,
                "entropy_norm": c.entropy_norm, "kept_set": c.kept_set, "cap_gib": cap_gib,
                "no_prefix_kv": no_prefix_kv, "fuse_text": fuse_text}

    t0 = time.perf_counter()
    model, _ = build_model(args.tiny, dev, torch.bfloat16 if cuda else torch.float32, bargs.pixels)
    _reset(dev)
    out["bf16_weights_gib"] = allocated()
    print(f"[7b] bf16 built in {time.perf_counter() - t0:.1f} s, {out['bf16_weights_gib']} GiB", flush=True)
    ref = run(model, "bf16")
    out["runs"]["bf16"] = ref
    if args.calibrate:
        # the same bf16 weights through transformers' eager norm/MLP instead of the fused kernels:
        # bf16 against bf16 rounded differently, the spread a near-tie in the scores gives
        r = run(model, "bf16, eager norm/MLP", fuse_text=False)
        r["agreement"] = agreement(ref, r)
        out["runs"]["bf16_eager_norm_mlp"] = r
        print(f"[7b] bf16 eager norm/MLP vs bf16: {json.dumps(r['agreement'])}", flush=True)

    t0 = time.perf_counter()
    proc = model.adapter.processor
    hf = model.adapter.model
    model.clear_cache()
    del model
    q = quantize_in_memory(hf, "nf4", dev)
    del hf
    gc.collect()
    _reset(dev)
    qmodel = Model(Qwen25VLAdapter(q, proc), name="qwen2.5-vl-7b-random-nf4")
    out["nf4_quantize_s"] = round(time.perf_counter() - t0, 2)
    out["nf4_weights_gib"] = allocated()
    print(f"[7b] nf4 quantized in memory in {out['nf4_quantize_s']} s, {out['nf4_weights_gib']} GiB "
          f"allocated", flush=True)
    for no_kv in ([False, True] if args.no_prefix_kv == "both" else [args.no_prefix_kv == "on"]):
        label = "nf4" + (", no prefix KV cache" if no_kv else "")
        r = run(qmodel, label, cap_gib=args.card_gib or None, no_prefix_kv=no_kv)
        r["agreement"] = agreement(ref, r)
        out["runs"]["nf4_no_prefix_kv" if no_kv else "nf4"] = r
        print(f"[7b] {label} vs bf16: {json.dumps(r['agreement'])}", flush=True)
    del qmodel, q
    gc.collect()
    _reset(dev)
    return out


# ----------------------------------------------------------------------------------------------
# part 2: the bundled model


def bundled_video(frames: int, seed: int = 0):
    """The demo's needle video (what `adapttoken demo` writes), as frames in memory."""
    from adapttoken.bench.gpu import MemoryVideo
    from adapttoken.demo import DEMO_ATTRIBUTE
    from adapttoken.training import synthetic as syn
    needles, qs = syn.plan(frames, seed, "what", "mc", attribute=DEMO_ATTRIBUTE)
    arr = torch.from_numpy(syn.make_frames(frames, seed, syn.DEFAULT_SIZE, needles))
    return MemoryVideo(arr, syn.DEFAULT_FPS, name=f"demo seed {seed}"), qs[0], needles[0]


def run_bundled(model, video, q, frames: int, dev, redundancy=0.9) -> dict:
    from adapttoken.demo import demo_config
    from adapttoken.pipeline import answer, select
    from adapttoken.question import Question
    cfg = demo_config(frames)
    cfg.redundancy_threshold = redundancy
    handle = video.open(frames, cfg.max_pixels, cfg.min_pixels, model.adapter.frames_per_slice)
    model.clear_cache()
    _reset(dev)
    t0 = time.perf_counter()
    sel = select(model, handle, Question(q.text, tuple(q.options)), cfg, "adapttoken")
    res = answer(sel, cfg.max_new_tokens)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    return {"answer": res.answer, "correct": res.answer.strip()[:1] == q.answer,
            "option_probs": {k: round(v, 4) for k, v in (res.option_probs or {}).items()},
            "wall_s": round(wall, 3), "peak_gib": round(_peak(dev), 4), "kept": len(res.kept_tokens),
            "entropy_norm": [None if g.entropy_norm is None else round(float(g.entropy_norm), 5)
                             for g in res.groups if g.entropy is not None],
            "kept_set": frozenset((t["slice"], t["row"], t["col"]) for t in res.kept_tokens)}


def part_bundled(args, dev) -> dict:
    import adapttoken as at
    from adapttoken.defaults import BUNDLED_MODEL
    from adapttoken.models.loading import Model
    from adapttoken.models.qwen2_5_vl import Qwen25VLAdapter
    from adapttoken.models.quant import QUANT_SKIP_MODULES, quantize_in_memory

    frames = args.bundled_frames
    video, q, needle = bundled_video(frames)
    out: dict = {"frames": frames, "question": q.text, "correct": q.answer,
                 "needle_frames": [needle.frame_start, needle.frame_end], "runs": {}}
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    ref_model = at.load_model(BUNDLED_MODEL, dtype=dtype, device=dev)
    run_bundled(ref_model, video, q, frames, dev)                      # warm-up
    ref = run_bundled(ref_model, video, q, frames, dev)
    ref["no_redundancy"] = run_bundled(ref_model, video, q, frames, dev, None)
    out["reference_dtype"] = dtype
    out["runs"][dtype] = ref
    for name in args.quantizations:
        m = at.load_model(BUNDLED_MODEL, dtype=dtype, device=dev, quantization=name)
        run_bundled(m, video, q, frames, dev)
        r = run_bundled(m, video, q, frames, dev)
        r["agreement"] = agreement(ref, r)
        r["no_redundancy"] = run_bundled(m, video, q, frames, dev, None)
        r["no_redundancy"]["agreement"] = agreement(ref["no_redundancy"], r["no_redundancy"])
        out["runs"][name] = r
        print(f"[bundled] {name}: answer {r['answer']!r}  {json.dumps(r['agreement'])}  no redundancy: "
              f"{json.dumps(r['no_redundancy']['agreement'])}", flush=True)
        del m
    # which modules stay unquantized: nf4 variants quantized in memory from the reference weights
    layer = ref_model.adapter.default_layer
    probe = f"model.language_model.layers.{layer}.self_attn"
    variants = {
        "nf4 (library default: vision tower + LM head kept)": QUANT_SKIP_MODULES,
        "nf4, probe layer q/k kept too": QUANT_SKIP_MODULES + (f"{probe}.q_proj", f"{probe}.k_proj"),
        "nf4, vision tower quantized too (LM head kept)": ("lm_head",),
    }
    out["variants"] = {}
    hf = ref_model.adapter.model
    for label, skip in variants.items():
        qm = quantize_in_memory(hf, "nf4", dev, skip_modules=skip)
        m = Model(Qwen25VLAdapter(qm, ref_model.adapter.processor), name=label)
        r = run_bundled(m, video, q, frames, dev)
        r["agreement"] = agreement(ref, r)
        r["no_redundancy"] = run_bundled(m, video, q, frames, dev, None)
        r["no_redundancy"]["agreement"] = agreement(ref["no_redundancy"], r["no_redundancy"])
        r["skip_modules"] = list(skip)
        out["variants"][label] = r
        print(f"[bundled] {label}: answer {r['answer']!r}  {json.dumps(r['agreement'])}  no "
              f"redundancy: {json.dumps(r['no_redundancy']['agreement'])}", flush=True)
        del m, qm
    return out


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k != "kept_set"}
    return o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_gpu_quant_out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=7040)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--card-gib", type=float, default=16e9 / 2 ** 30,
                    help="the nf4 run's memory cap (default: a 16 GB card, 14.9 GiB); 0: none")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--bundled-frames", type=int, default=2048)
    ap.add_argument("--quantizations", nargs="+", default=["nf4", "int8"])
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--calibrate", action="store_true",
                    help="part 1: also bf16 with eager norm/MLP (no fused kernels) against bf16")
    ap.add_argument("--no-prefix-kv", choices=["off", "on", "both"], default="off",
                    help="part 1: the nf4 run without the prefix key/value cache (on), or both")
    ap.add_argument("--tiny", action="store_true", help="part 1 on the tiny random config (smoke test)")
    ap.add_argument("--skip-bundled", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    import platform

    import transformers
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    res = {"meta": {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "bitsandbytes": bnb, "python": platform.python_version(),
                    "command": "python docs/bench_gpu_quant/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)}}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_bundled:
        res["bundled"] = _strip(part_bundled(args, dev))
        (outdir / "compare.json").write_text(json.dumps(res, indent=1, default=str))
    if not args.skip_7b:
        res["qwen2_5_vl_7b_random"] = _strip(part_7b(args, dev))
    res["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    (outdir / "compare.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str)[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
