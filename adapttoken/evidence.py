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


def _thumb_data_url(frame: torch.Tensor, width: int) -> str:
    """A small JPEG of one uint8 [H, W, 3] frame as a data URL (for the web timeline)."""
    import base64
    import io

    from PIL import Image
    img = Image.fromarray(frame.numpy())
    h = max(1, round(img.height * width / max(1, img.width)))
    img = img.resize((width, h))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def timeline(selection, bins: int = 200, moments: int = 4, thumb_width: int = 96) -> dict:
    """What the web timeline draws (web/js/adapttoken.js), in video time (seconds):
    per group its time span, H/Hmax, relevance, budget and kept tokens (skipped groups flagged);
    the kept tokens' density over `bins` equal time bins; Lite's stop (the last processed group);
    the top moments with small thumbnails."""
    f = selection.features
    v = f.video
    ts = np.asarray(v.plan.timestamps, dtype=np.float64)
    duration = float(max(v.info.duration or 0.0, ts[-1] if len(ts) else 0.0)) or 1.0
    skipped = set(selection.skipped_groups)
    groups = []
    for rep in sorted(selection.groups, key=lambda r: r.group):
        t = rep.timestamps or [0.0]
        groups.append({"group": rep.group, "t0": float(min(t)), "t1": float(max(t)),
                       "h": rep.entropy_norm, "relevance": rep.relevance, "budget": rep.budget,
                       "kept": rep.kept, "skipped": rep.group in skipped})
    gids = selection.gids.detach().cpu().long()
    pos = (gids // f.tokens_per_slice).numpy() * v.frames_per_slice
    hist, _ = np.histogram(ts[pos] if len(pos) else [], bins=bins, range=(0.0, duration))
    stop = (min(skipped) - 1) if skipped else None
    ms = key_moments(selection, moments)
    if ms:
        for m, img in zip(ms, moment_frames(selection, ms)):
            m["thumb"] = _thumb_data_url(img, thumb_width)
    return {"duration": duration, "groups": groups, "density": hist.tolist(), "stop": stop,
            "moments": ms, "method": selection.method}
