"""Budget allocate: split one global token budget over the groups by relevance, keep each group's
top tokens by attention score, and drop tokens that repeat the same place in the picture.

[paper] lower entropy -> larger share. [ours] the formulas:
- relevance r_g = 1 - H_g / H_max (linear, default), or softmax(-(H_g / H_max) / tau), or even;
- B_g = B * r_g / sum(r) after an optional per-group floor, clipped to the group's token count,
  the overflow redistributed (water-filling), rounded by largest remainder so sum(B_g) = B;
- location-aware redundancy removal: a kept token is redundant when the most recent kept token at
  the same (row, col) in an earlier slice has cosine similarity > theta in the visual embedding;
  it is dropped and its group backfills with its next-ranked token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError

RELEVANCE_MODES = ("linear", "softmax", "even")


def check_budget(budget) -> int:
    """The token budget as an int >= 1, else InputError. A budget above the tokens there are is
    fine: every token is available (redundancy removal may still drop repeats)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise InputError(f"budget={budget!r} must be a positive number of tokens: set it to 1 or more "
                         f"(7040 by default; more than the video has keeps all of them)")
    return int(budget)


def relevance(entropy_norm, mode: str = "linear", tau: float = 0.1) -> np.ndarray:
    """Per-group relevance from normalised entropies H_g / H_max in [0, 1]."""
    h = np.clip(np.asarray(entropy_norm, dtype=np.float64), 0.0, 1.0)
    if mode == "linear":
        return 1.0 - h
    if mode == "softmax":
        if tau <= 0:
            raise InputError(f"tau={tau} must be > 0 for softmax relevance")
        z = -h / tau
        e = np.exp(z - z.max())
        return e / e.sum()
    if mode == "even":
        return np.ones_like(h)
    raise InputError(f"relevance={mode!r} is not known: use one of {', '.join(RELEVANCE_MODES)}")


def split_budget(rel, capacity, budget: int, floor: int = 0) -> list[int]:
    """Integer budgets per group: proportional to `rel`, at least `floor` (where capacity allows),
    at most `capacity`, summing to min(budget, sum(capacity))."""
    rel = np.asarray(rel, dtype=np.float64)
    cap = np.asarray(capacity, dtype=np.int64)
    check_budget(budget)
    total = int(min(budget, cap.sum()))
    n = len(cap)
    floor = max(0, min(int(floor), total // max(n, 1)))
    base = np.minimum(cap, floor).astype(np.float64)
    x = base.copy()
    left = total - base.sum()
    active = x < cap
    while left > 1e-9 and active.any():
        w = np.where(active, rel, 0.0)
        if w.sum() <= 0:                     # nobody relevant: share evenly among groups with room
            w = active.astype(np.float64)
        share = left * w / w.sum()
        room = cap - x
        add = np.minimum(share, room)
        x += add
        left -= add.sum()
        active = (cap - x) > 1e-9
        if np.allclose(add, 0):
            break
    out = np.floor(x + 1e-9).astype(np.int64)
    rem = total - int(out.sum())
    if rem > 0:                               # largest remainder, only where there is room
        frac = np.where(out < cap, x - out, -1.0)
        for i in np.argsort(-frac, kind="stable"):
            if rem == 0:
                break
            if out[i] < cap[i]:
                out[i] += 1
                rem -= 1
    return out.tolist()


def remove_redundancy(ranked: list[torch.Tensor], budgets: list[int], features,
                      threshold: float, max_rounds: int = 256) -> tuple[list[torch.Tensor], int]:
    """Location-aware redundancy removal with backfill (see module doc).

    ranked[g]: the group's token ids by descending score; budgets[g]: how many it keeps.
    Returns the kept ids per group and the number of tokens dropped as redundant."""
    tps = features.tokens_per_slice
    kept = [r[:b].clone() for r, b in zip(ranked, budgets)]
    ptr = list(budgets)
    dropped_total = 0
    for _ in range(max_rounds):
        owner = torch.cat([torch.full((len(k),), g, dtype=torch.long) for g, k in enumerate(kept)])
        gids = torch.cat(kept)
        if gids.numel() < 2:
            break
        loc, sl = gids % tps, gids // tps
        order = torch.argsort(loc * (features.num_slices + 1) + sl)
        gids, owner, loc = gids[order], owner[order], loc[order]
        emb, _ = features.tokens(gids)
        dim = getattr(getattr(features, "adapter", None), "main_dim", None)  # Qwen3-VL: no deepstack
        emb = torch.nn.functional.normalize(emb[:, :dim].float(), dim=-1)
        cos = (emb[1:] * emb[:-1]).sum(-1).cpu()
        raw = torch.zeros(len(gids), dtype=torch.bool)
        raw[1:] = (loc[1:] == loc[:-1]) & (cos > threshold)
        # only drop where the predecessor is itself kept; chains resolve over the next rounds
        red = raw.clone()
        red[1:] &= ~raw[:-1]
        if not red.any():
            break
        dropped_total += int(red.sum())
        drop = set(gids[red].tolist())
        per_group = torch.bincount(owner[red], minlength=len(kept)).tolist()
        for g, d in enumerate(per_group):
            if d == 0:
                continue
            k = kept[g]
            k = k[~torch.isin(k, torch.tensor(sorted(drop), dtype=torch.long))]
            fresh = ranked[g][ptr[g]:ptr[g] + d]
            ptr[g] += len(fresh)
            kept[g] = torch.cat([k, fresh])
    return kept, dropped_total


@dataclass
class GroupReport:
    """Per group: which frames it saw, its entropy, relevance, budget and kept count."""
    group: int
    frame_indices: list[int]
    timestamps: list[float]
    entropy: float | None = None
    entropy_norm: float | None = None
    relevance: float | None = None
    budget: int = 0
    kept: int = 0
    option_probs: list[float] | None = None


@dataclass
class Selection:
    """The visual tokens chosen for the answer, in temporal order, with the story of how."""
    features: object                     # SliceFeatures
    question: object                     # Question
    prompt: object                       # Prompt
    gids: torch.Tensor                   # [n] sorted global token ids
    method: str
    budget: int
    groups: list[GroupReport] = field(default_factory=list)
    skipped_groups: list[int] = field(default_factory=list)
    redundant_dropped: int = 0
    seconds: dict = field(default_factory=dict)
    group_size: int | None = None            # slices per group as run (None: no groups, uniform)
    requested_group_size: int | None = None  # as asked; larger when clamped to the video's slices

    def kept_tokens(self) -> list[dict]:
        """Each kept token's frame index (source video), timestamp, slice, row and column."""
        f = self.features
        v = f.video
        tps, cols = f.tokens_per_slice, f.grid[1]
        out = []
        for gid in self.gids.tolist():
            s, r, c = gid // tps, (gid % tps) // cols, gid % cols
            pos = s * v.frames_per_slice
            out.append({"slice": s, "frame_index": int(v.plan.indices[pos]),
                        "timestamp": float(v.plan.timestamps[pos]), "row": r, "col": c})
        return out


def _group_report(features, g: int, slices) -> GroupReport:
    v = features.video
    pos = v.frame_positions(np.sort(np.asarray(slices)))
    return GroupReport(g, [int(v.plan.indices[p]) for p in pos],
                       [round(float(v.plan.timestamps[p]), 4) for p in pos])


def allocate(scored, budget: int = 7040, relevance_mode: str = "linear", tau: float = 0.1,
             floor: int = 0, redundancy_threshold: float | None = 0.9, hooks=None,
             method: str | None = None) -> Selection:
    """Run (or reuse) the group passes of `scored`, then split the budget and select tokens."""
    check_budget(budget)
    if redundancy_threshold is not None and not -1.0 <= redundancy_threshold <= 1.0:
        raise InputError(f"redundancy threshold={redundancy_threshold} must be within -1..1 "
                         f"(cosine similarity), or None to keep every selected token")
    done, skipped = scored.evaluate(hooks)
    ranked = scored.ranked
    features = ranked.features
    t0 = time.perf_counter()
    hn = [d.normalized for d in done]
    rel = relevance(hn, relevance_mode, tau)
    order = []
    for d in done:
        p = d.pass_
        order.append(p.gids[torch.argsort(p.scores.cpu(), descending=True, stable=True)])
    caps = [len(o) for o in order]
    budgets = split_budget(rel, caps, int(budget), floor)
    if redundancy_threshold is not None:
        kept, n_red = remove_redundancy(order, budgets, features, float(redundancy_threshold))
    else:
        kept, n_red = [o[:b] for o, b in zip(order, budgets)], 0
    reports = []
    for d, r, b, k in zip(done, rel, budgets, kept):
        rep = _group_report(features, d.group, ranked.groups.slices[d.group])
        rep.entropy, rep.entropy_norm = round(d.entropy, 6), round(d.normalized, 6)
        rep.relevance, rep.budget, rep.kept, rep.option_probs = round(float(r), 6), int(b), len(k), d.option_probs
        reports.append(rep)
    for g in skipped:
        reports.append(_group_report(features, g, ranked.groups.slices[g]))
    reports.sort(key=lambda r: r.group)
    gids = torch.sort(torch.cat(kept)).values
    features.timer.add("allocate", time.perf_counter() - t0)
    if method is None:
        method = "lite" if scored.stop is not None else "adapttoken"
    groups = ranked.groups
    return Selection(features, ranked.question, ranked.prompt, gids, method, int(budget), reports,
                     skipped, n_red, features.timer.snapshot(), groups.group_size,
                     groups.requested_group_size)


def even_split(scored, budget: int = 7040, hooks=None) -> Selection:
    """FlexSelect-style baseline: attention ranking with B / G tokens per group, no entropy, no
    redundancy removal."""
    return allocate(scored, budget, relevance_mode="even", redundancy_threshold=None, hooks=hooks,
                    method="even_split")


def uniform_frames(model, video, question, budget: int = 7040) -> Selection:
    """Baseline every VLM pack does today: as many evenly spaced slices as fit the budget, all of
    their tokens, no group pass."""
    from .question import Question
    check_budget(budget)
    q = question if isinstance(question, Question) else Question(question)
    features = model.features_for(video)
    n = max(1, min(features.num_slices, int(budget) // features.tokens_per_slice))
    slices = np.unique(np.round(np.linspace(0, features.num_slices - 1, n)).astype(np.int64))
    gids = features.gids_of_slices(slices)
    return Selection(features, q, model.adapter.build_prompt(q), gids, "uniform", int(budget))
