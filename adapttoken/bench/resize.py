"""The GPU's antialiased bicubic resize of large frames (what preprocessing does to a 1080p or 4K
source before the vision tower), against the same linear map written as two float32 matmuls
(height then width operators taken from torch's own interpolate on identity matrices).

`python -m adapttoken.bench.resize` (CUDA): milliseconds per 32 frames, seconds per 4096 frames,
and how far the two results are apart (uint8 levels) on random frames.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def torchvision_resize(fr: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """What models/_common.resize_exact runs: uint8 [N, H, W, 3] -> [N, h, w, 3]."""
    import torchvision.transforms.v2.functional as tvF
    x = tvF.resize(fr.permute(0, 3, 1, 2), [h, w], interpolation=tvF.InterpolationMode.BICUBIC,
                   antialias=True)
    return x.permute(0, 2, 3, 1).contiguous()


def operators(H: int, W: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[h, H] and [W, w]: the resize along each axis as a matrix (interpolate of an identity)."""
    eh = torch.eye(H, device=device).view(1, 1, H, H)
    Wh = F.interpolate(eh, size=(H, h), mode="bicubic", antialias=True, align_corners=False)[0, 0].T
    ew = torch.eye(W, device=device).view(1, 1, W, W)
    Ww = F.interpolate(ew, size=(W, w), mode="bicubic", antialias=True, align_corners=False)[0, 0]
    return Wh.contiguous(), Ww.contiguous()


def matmul_resize(fr: torch.Tensor, Wh: torch.Tensor, Ww: torch.Tensor) -> torch.Tensor:
    x = fr.permute(0, 3, 1, 2).float()
    z = torch.matmul(torch.matmul(Wh, x), Ww)
    return z.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+", default=["2160x3840", "1080x1920"])
    ap.add_argument("--size", default="308x532", help="HxW after the resize")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w = (int(v) for v in args.size.split("x"))
    for src in args.sources:
        H, W = (int(v) for v in src.split("x"))
        fr = torch.randint(0, 256, (args.frames, H, W, 3), dtype=torch.uint8, device=dev)
        Wh, Ww = operators(H, W, h, w, dev)
        d = (torchvision_resize(fr, h, w).int() - matmul_resize(fr, Wh, Ww).int()).abs()
        print(f"{H}x{W} -> {h}x{w}: max difference {int(d.max())} levels, "
              f"{float((d > 0).float().mean()):.2e} of the values differ")
        for name, fn in (("torchvision antialiased bicubic", lambda: torchvision_resize(fr, h, w)),
                         ("two float32 matmuls", lambda: matmul_resize(fr, Wh, Ww))):
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = (time.perf_counter() - t0) / args.iters
            print(f"  {name}: {dt * 1e3:.1f} ms per {args.frames} frames = "
                  f"{dt / args.frames * 4096:.2f} s per 4096 frames", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
