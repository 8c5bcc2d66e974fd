"""Redundancy removal where the picture repeats: the time budget.remove_redundancy takes when most
tokens are near-duplicates of the token before them at their location (a still background, or the
`bench gpu` clip downscaled from 4K: 207,550 of 214,016 tokens dropped at 2048 frames), walking each
location's chain with gathers (`dense=False`) or masks (`dense=True`, the default on CUDA).

`python -m adapttoken.bench.redundancy --device cuda` (or cpu): seconds per call of each walk, the
tokens dropped and kept, and whether both walks keep the same tokens. Embeddings: a random vector per
location plus noise (`--noise`; 0.25 at dim 64 puts same-location tokens near cosine 0.94, above
the 0.9 threshold), strided groups as the pipeline makes them, each group's ranking random.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


class Table:
    """Token embeddings by global id: the two facts remove_redundancy reads from SliceFeatures."""

    def __init__(self, emb: torch.Tensor, tokens_per_slice: int):
        self.emb, self.tokens_per_slice = emb, tokens_per_slice

    def tokens(self, gids, hooks=None, columns=None):
        return self.emb[gids.to(self.emb.device)][:, :columns], None


def case(groups: int, slices: int, tps: int, dim: int, noise: float, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = groups * slices * tps
    loc = torch.arange(n) % tps
    emb = torch.randn(tps, dim, generator=g)[loc] + noise * torch.randn(n, dim, generator=g)
    ranked = []
    for k in range(groups):
        sl = torch.arange(k, groups * slices, groups)
        gids = (sl[:, None] * tps + torch.arange(tps)).reshape(-1)
        ranked.append(gids[torch.randperm(len(gids), generator=g)].to(device))
    return Table(emb.to(device), tps), ranked


def main(argv=None) -> int:
    from ..budget import remove_redundancy, split_budget
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--slices", type=int, default=64, help="slices per group")
    ap.add_argument("--tokens-per-slice", type=int, default=209)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--budget", type=int, default=7040)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    feats, ranked = case(args.groups, args.slices, args.tokens_per_slice, args.dim, args.noise, dev)
    budgets = split_budget(np.ones(args.groups), [len(r) for r in ranked], args.budget, 0)
    out = {}
    for dense in (False, True):
        times = []
        for _ in range(args.iters):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            kept, dropped = remove_redundancy(ranked, budgets, feats, 0.9, np.ones(args.groups),
                                              dense=dense)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        out[dense] = [k.tolist() for k in kept]
        print(f"dense={dense}: {np.median(times):.3f} s (median of {args.iters}), dropped {dropped}, "
              f"kept {sum(len(k) for k in kept)}", flush=True)
    print("same tokens kept:", out[False] == out[True])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
