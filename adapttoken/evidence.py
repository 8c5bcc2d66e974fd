"""Key moments: the frames a selection leans on, ranked, with their times.

A moment is one slice (frames_per_slice consecutive sampled frames, 2 for Qwen) that kept visual
tokens. Its score is the sum of its kept tokens' probe scores (the question's attention at the
reference layer in the pass of the group it belongs to); only groups that received budget keep
tokens, so every moment lies in a group that mattered. Without scores (uniform frames) every kept
token counts 1. Ties go to the earlier moment. `time` is the slice's first sampled frame's time in
seconds and `frame` its index in the source video.
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_MOMENTS = 8


def key_moments(selection, count: int = DEFAULT_MOMENTS) -> list[dict]:
    """The `count` highest-scoring moments of `selection`, best first: dicts with time (s), frame
    (source index), position (plan index), slice, group (None when ungrouped), score, tokens."""
    if count < 1:
        return []
    f = selection.features
    v = f.video
    tps = f.tokens_per_slice
    gids = selection.gids.detach().cpu().long()
    if len(gids) == 0:
        return []
    w = selection.scores
    w = torch.ones(len(gids)) if w is None or len(w) != len(gids) else w.detach().cpu().double()
    sl = gids // tps
    uniq, inv = torch.unique(sl, return_inverse=True)
    score = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, w.double())
    tokens = torch.bincount(inv, minlength=len(uniq))
    order = sorted(range(len(uniq)), key=lambda i: (-float(score[i]), int(uniq[i])))[:count]
    group_of = {}
    for rep in selection.groups:
        for fi in rep.frame_indices:
            group_of.setdefault(int(fi), rep.group)
    out = []
    for i in order:
        s = int(uniq[i])
        pos = s * v.frames_per_slice
        frame = int(v.plan.indices[pos])
        out.append({"time": round(float(v.plan.timestamps[pos]), 4), "frame": frame,
                    "position": pos, "slice": s, "group": group_of.get(frame),
                    "score": round(float(score[i]), 6), "tokens": int(tokens[i])})
    return out


def moment_frames(selection, moments: list[dict]) -> torch.Tensor:
    """uint8 frames [k, H, W, 3] of the moments at the source's size (decoded by plan position)."""
    if not moments:
        info = selection.features.video.info
        return torch.zeros((0, info.height, info.width, 3), dtype=torch.uint8)
    pos = np.asarray([m["position"] for m in moments], dtype=np.int64)
    order = np.argsort(pos, kind="stable")                 # decode in temporal order
    frames = selection.features.video.read(pos[order])
    out = torch.empty_like(frames)
    out[torch.as_tensor(order)] = frames
    return out
