"""Does the vision tower's output carry a needle's shape? A linear read-out of frozen merged tokens.

One 2-frame slice per example (the benchmark's 112x112 scenes, grey distractors included), one
needle of a random colour and 32-48 px (the shape task's default), shapes balanced; the tower's 16
merged tokens; a logistic regression trained on 75% of the examples, accuracy on the other 25%
(chance 25%), on (a) the mean of the tokens the needle covers, (b) all 16 tokens concatenated.

    python docs/bench_synthetic_tasks/shape_probe.py MODEL_DIR [N]
"""
from __future__ import annotations

import sys

import numpy as np
import torch

import adapttoken as at
from adapttoken.training import synthetic as syn


def features(model_dir: str, n: int):
    """(mean of the needle's tokens, all 16 tokens) per example, and the shape labels."""
    ad = at.load_model(model_dir, dtype="float32", device="cpu").adapter
    rng = np.random.default_rng(0)
    x_mean, x_all, y = [], [], []
    for i in range(n):
        colour = list(syn.COLOURS)[rng.integers(0, 4)]
        nd = syn._needle_at(rng, (0, 2), colour, syn.SHAPES[i % 4], syn.DEFAULT_SIZE, (32, 48))
        fr = syn.make_frames(2, int(rng.integers(0, 10**6)), syn.DEFAULT_SIZE, [nd])
        with torch.no_grad():
            f = ad.encode(torch.from_numpy(fr), syn.DEFAULT_SIZE).reshape(16, -1).float()
        x_mean.append(f[[r * 4 + c for r, c in nd.tokens()]].mean(0))
        x_all.append(f.reshape(-1))
        y.append(i % 4)
    return torch.stack(x_mean), torch.stack(x_all), torch.tensor(y)


def probe(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    n = int(0.75 * len(y))
    lin = torch.nn.Linear(x.shape[1], 4)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:n]), y[:n]).backward()
        opt.step()
    with torch.no_grad():
        acc = (lin(x[n:]).argmax(-1) == y[n:]).float().mean().item()
        tr = (lin(x[:n]).argmax(-1) == y[:n]).float().mean().item()
    print(f"{name}: held-out {acc:.3f} (train {tr:.3f}), n={len(y)}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_mean, x_all, y = features(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1200)
    probe(x_mean, y, "mean of the needle's tokens")
    probe(x_all, y, "all 16 tokens concatenated")
