"""Kept-token overlap of bf16 and quantized selections against a float32 reference (CUDA).

The GPU agreement tests (tests/gpu/test_gpu_quant.py, test_gpu_fp8.py) hold the quantized bundled
model to >= 0.90 of bf16's kept tokens on the demo's 2048-frame needle video, with and without
redundancy removal. Without it, most of the 256 kept tokens are background tokens that the probe
ranks nearly alike, and how many of them any change of precision reorders is a property of the
model. This measures that noise floor: each precision's overlap with float32's selection (and
with bf16's), so a quantized run can be held to "no worse than bf16 against float32", as the FP8
target does for the 7B architecture.

    python docs/bench_gpu_quant/noise_floor.py MODEL_DIR [MODEL_DIR ...] --out OUT.json

(--device cpu --variants float32 bf16 runs the unquantized part on a CPU.)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import adapttoken as at
from adapttoken.bench.gpu import MemoryVideo
from adapttoken.demo import DEMO_ATTRIBUTE, demo_config
from adapttoken.pipeline import answer, select
from adapttoken.training import synthetic as syn

FRAMES = 2048
VARIANTS = (("float32", "float32", None), ("bf16", "bf16", None), ("fp8", "bf16", "fp8"),
            ("nf4", "bf16", "nf4"), ("int8", "bf16", "int8"))


def run(model, video, q, redundancy):
    cfg = demo_config(FRAMES)
    cfg.redundancy_threshold = redundancy
    handle = video.open(FRAMES, cfg.max_pixels, cfg.min_pixels, model.adapter.frames_per_slice)
    model.clear_cache()
    sel = select(model, handle, at.Question(q.text, tuple(q.options)), cfg, "adapttoken")
    res = answer(sel, cfg.max_new_tokens)
    kept = {(t["slice"], t["row"], t["col"]) for t in res.kept_tokens}
    return res.answer, kept, [g.entropy_norm for g in res.groups if g.entropy is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS],
                    choices=[v[0] for v in VARIANTS])
    args = ap.parse_args(argv)
    needles, qs = syn.plan(FRAMES, 0, "what", "mc", attribute=DEMO_ATTRIBUTE)
    video = MemoryVideo(torch.from_numpy(syn.make_frames(FRAMES, 0, syn.DEFAULT_SIZE, needles)),
                        syn.DEFAULT_FPS, name="needle")
    q = qs[0]
    dev = torch.device(args.device)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "frames": FRAMES, "models": {}}
    for path in args.models:
        runs = {}
        for name, dtype, quant in VARIANTS:
            if name not in args.variants:
                continue
            t0 = time.perf_counter()
            try:
                model = at.load_model(path, dtype=dtype, device=dev, quantization=quant)
            except Exception as e:                      # e.g. no bitsandbytes: say so, go on
                runs[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            runs[name] = {red: run(model, video, q, red) for red in (0.9, None)}
            del model
            torch.cuda.empty_cache()
            print(f"{path} {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        rows = {}
        for name, r in runs.items():
            if "error" in r:
                rows[name] = r
                continue
            row = {}
            for red in (0.9, None):
                ans, kept, h = r[red]
                key = "redundancy_0.9" if red is not None else "redundancy_off"
                cell = {"answer": ans, "kept": len(kept)}
                for ref in ("float32", "bf16"):
                    if ref in runs and "error" not in runs[ref] and ref != name:
                        rans, rkept, rh = runs[ref][red]
                        cell[f"overlap_vs_{ref}"] = round(len(kept & rkept) / max(1, len(rkept)), 4)
                        cell[f"max_dH_vs_{ref}"] = round(max(abs(a - b) for a, b in zip(h, rh)), 4)
                row[key] = cell
            rows[name] = row
        out["models"][path] = rows
        print(json.dumps({path: rows}, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
