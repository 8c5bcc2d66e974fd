"""Budget allocate: split one global token budget over the groups by relevance, keep each group's
top tokens by attention score, and drop tokens that repeat the same place in the picture.

[paper] lower entropy -> larger share. [ours] the formulas:
- relevance r_g = 1 - H_g / H_max (linear, default), or softmax(-(H_g / H_max) / tau), or even;
- B_g = B * r_g / sum(r) after an optional per-group floor, clipped to the group's token count,
  the overflow redistributed (water-filling), rounded by largest remainder so sum(B_g) = B;
- location-aware redundancy removal: a kept token is redundant when the most recent kept token at
  the same (row, col) in an earlier slice has cosine similarity > theta in the visual embedding;
  it is dropped and its group backfills with its next-ranked tokens, which the same rule checks;
  budget a group cannot use (its ranked tokens ran out) flows to the other groups in proportion to
  their relevance, so the budget is spent while any group has tokens left (remove_redundancy);
  optionally (refill=True, off by default) budget still unspent once every ranked token was judged
  goes back to the dropped tokens, each group up to its own share, highest-ranked first.
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


def _unit_embeddings(features, gids: torch.Tensor) -> torch.Tensor:
    """L2-normalised visual embeddings of `gids` (float32, on the features' device)."""
    dim = getattr(getattr(features, "adapter", None), "main_dim", None)  # Qwen3-VL: no deepstack
    emb, _ = features.tokens(gids, columns=dim)                         # (nor copied)
    return torch.nn.functional.normalize(emb[:, :dim].float(), dim=-1)


def _scan_redundant(gids: torch.Tensor, fresh: torch.Tensor, rows: torch.Tensor, unit: torch.Tensor,
                    tps: int, threshold: float, dense: bool | None = None) -> torch.Tensor:
    """One pass of the redundancy rule over a set of tokens: at each location, in temporal order,
    a token is redundant when its cosine similarity with the most recent non-redundant token at
    that location is > threshold. unit[rows[i]] is token i's unit embedding. Returns a bool mask
    over `gids`.

    The tokens that are not `fresh` must be the set kept by the previous pass (each one already
    passed the rule against the one before it). So a location without fresh tokens is skipped, its
    scan starts at the last kept token before its first fresh one, and a kept token whose most
    recent kept token is still the one before it is not compared again. The loop runs over
    positions within a location (at most the number of tokens at the busiest location), each step
    vectorised over the locations still active.

    dense (default: on CUDA): each step compares every active location and masks out those that
    need no comparison, instead of gathering the ones that do (torch.nonzero, a wait for the GPU
    per step). Same result; on a GPU the steps then queue without waiting, which matters where a
    picture repeats (a still background: every round walks long chains, hundreds of steps)."""
    dev = gids.device
    red = torch.zeros(len(gids), dtype=torch.bool, device=dev)
    if len(gids) < 2 or not bool(fresh.any()):
        return red
    loc, sl = gids % tps, gids // tps
    order = torch.argsort(loc * (int(sl.max()) + 1) + sl)
    loc_o, fresh_o = loc[order], fresh[order]
    n = len(order)
    start = torch.ones(n, dtype=torch.bool, device=dev)
    start[1:] = loc_o[1:] != loc_o[:-1]
    chain = torch.cumsum(start.long(), 0) - 1
    n_chains = int(chain[-1]) + 1
    first = torch.nonzero(start).squeeze(1)                       # chain c starts at first[c]
    pos = torch.arange(n, device=dev) - first[chain]
    # the first fresh position of each chain (none: n + 1); the scan starts one before it
    none = torch.full((n_chains,), n + 1, dtype=torch.long, device=dev)
    ff = none.scatter_reduce(0, chain[fresh_o], pos[fresh_o], reduce="amin")
    begin = (ff - 1).clamp(min=0)
    use = pos >= begin[chain]
    order, chain, pos = order[use], chain[use], pos[use] - begin[chain[use]]
    length = torch.bincount(chain, minlength=n_chains)
    # chains sorted by length, longest first: step k touches the first active[k] rows only
    by_len = torch.argsort(length, descending=True, stable=True)
    row_of = torch.empty_like(by_len)
    row_of[by_len] = torch.arange(n_chains, device=dev)
    lengths = length[by_len].tolist()
    n_rows = sum(1 for x in lengths if x > 1)                     # chains with something to judge
    if n_rows == 0:
        return red
    top = lengths[0]
    r_of = row_of[chain]
    sel = r_of < n_rows
    slot = torch.full((n_rows, top), -1, dtype=torch.long, device=dev)
    slot[r_of[sel], pos[sel]] = order[sel]
    active = np.searchsorted(-np.asarray(lengths[:n_rows]), -np.arange(top), side="left").tolist()
    filled = slot >= 0
    urow = torch.where(filled, rows[slot.clamp(min=0)], -1)      # rows of `unit`
    old = filled & ~fresh[slot.clamp(min=0)]
    # the unit row of the closest earlier token that is not fresh (-2: none)
    k_idx = torch.arange(top, device=dev).expand(n_rows, top)
    last_old = torch.cummax(torch.where(old, k_idx, -1), dim=1).values
    prev_old = torch.full_like(urow, -2)
    prev_old[:, 1:] = torch.where(last_old[:, :-1] >= 0,
                                  urow.gather(1, last_old[:, :-1].clamp(min=0)), -2)
    known = old & (prev_old >= 0)                                 # candidates for "already passed"
    hit = torch.zeros((n_rows, top), dtype=torch.bool, device=dev)
    last = urow[:, 0].clone()
    if dense is None:
        dense = dev.type == "cuda"
    for k in range(1, top):
        m = active[k]                                             # chains longer than k
        cand, prev = urow[:m, k], last[:m]
        need = ~(known[:m, k] & (prev == prev_old[:m, k]))
        if dense:
            r = need & ((unit[cand] * unit[prev]).sum(-1) > threshold)
        else:
            check = torch.nonzero(need).squeeze(1)
            r = torch.zeros(m, dtype=torch.bool, device=dev)
            if len(check):
                r[check] = (unit[cand[check]] * unit[prev[check]]).sum(-1) > threshold
        hit[:m, k] = r
        last[:m] = torch.where(r, prev, cand)
    red[slot[hit]] = True
    return red


def remove_redundancy(ranked: list[torch.Tensor], budgets: list[int], features,
                      threshold: float, relevance=None, refill: bool = False,
                      dense: bool | None = None) -> tuple[list[torch.Tensor], int]:
    """Location-aware redundancy removal with backfill and budget flow.

    ranked[g]: group g's token ids by descending score; budgets[g]: how many it keeps;
    relevance[g]: its relevance (None: equal), which steers budget that flows between groups.
    Returns the kept ids per group (in rank order) and the number of tokens dropped as redundant.

    The rule, applied in rounds until nothing changes:
    1. candidates: every kept token so far plus the fresh ones (round 0: each group's top
       budgets[g] tokens);
    2. at each (row, col), in temporal order over all groups' candidates, a candidate is dropped
       when the most recent kept candidate at that location has cosine similarity > threshold
       (kept tokens are judged again: a fresh token can make a later kept token redundant);
       a dropped token never comes back;
    3. backfill: a group with fewer kept tokens than its budget takes that many of its next-ranked
       tokens as fresh candidates;
    4. flow: budget a group cannot use because its ranked tokens ran out moves to the groups that
       still have tokens beyond their own deficit, in proportion to their relevance (split_budget:
       capped at what each can take, overflow passed on, evenly when none of them is relevant);
       their extra share is taken as fresh candidates in the same round.
    It stops when no group takes a fresh token: then every group has kept its budget or used all
    of its ranked tokens, so the total budget is spent whenever tokens are left to spend. Each round
    takes at least one fresh token, so the rounds are bounded by the number of ranked tokens.
    Every token's embedding is read once, when it becomes a candidate.
    5. refill (refill=True): budget still unspent then (every ranked token was judged) goes back
       to dropped tokens, highest-ranked first: to each group up to its own budget (split by
       relevance when the deficits exceed what is left), then to any group with dropped tokens
       left. The result then holds repeats; the count returned is of the tokens dropped and not
       taken back. With the bundled demo model, whose background embeddings lie within cosine 0.9
       of each other, the rule alone kept ~22 of 256 tokens per answer pass. Off by default: the
       refilled tokens are near-ties whose order float8 noise changes (the FP8 bundled model kept
       207 of float32's 256 tokens, against >= 90%; docs/bench_synthetic/REDUNDANCY.md).
    dense: how each location's chain is walked (_scan_redundant; default: dense on CUDA); the
    result is the same either way."""
    G = len(ranked)
    if G == 0:
        return [], 0
    out_dev = ranked[0].device
    tps = features.tokens_per_slice
    lens = np.array([len(r) for r in ranked], dtype=np.int64)
    budget = np.minimum(np.asarray(budgets, dtype=np.int64), lens)
    rel = np.ones(G) if relevance is None else np.asarray(relevance, dtype=np.float64)
    flat = torch.cat([r.reshape(-1).long().to(out_dev) for r in ranked])
    offs = np.concatenate([[0], np.cumsum(lens)])
    ptr = np.zeros(G, dtype=np.int64)
    take = budget.copy()
    dev = out_dev
    cur = torch.zeros(0, dtype=torch.long, device=dev)            # flat indices of kept tokens
    pool, size, row_of = None, 0, None                            # unit embeddings of candidates
    dropped = 0
    while take.sum() > 0:
        new = torch.cat([torch.arange(offs[g] + ptr[g], offs[g] + ptr[g] + take[g], device=dev)
                         for g in range(G) if take[g] > 0])
        ptr += take
        u = _unit_embeddings(features, flat[new])
        if pool is None:                                          # book-keeping where the features are
            dev = u.device
            flat, new, cur = flat.to(dev), new.to(dev), cur.to(dev)
            row_of = torch.full((len(flat),), -1, dtype=torch.long, device=dev)
            pool = u.new_empty((2 * len(new), u.shape[1]))
        if size + len(new) > len(pool):                           # full: keep the live rows only
            grown = u.new_empty((2 * (len(cur) + len(new)), u.shape[1]))
            grown[:len(cur)] = pool[row_of[cur]]
            row_of.fill_(-1)
            row_of[cur] = torch.arange(len(cur), device=dev)
            pool, size = grown, len(cur)
        pool[size:size + len(new)] = u
        row_of[new] = torch.arange(size, size + len(new), device=dev)
        size += len(new)
        del u
        locs = torch.unique(flat[new] % tps)
        near = cur[torch.isin(flat[cur] % tps, locs)]
        cand = torch.cat([near, new])
        fresh = torch.zeros(len(cand), dtype=torch.bool, device=dev)
        fresh[len(near):] = True
        red = _scan_redundant(flat[cand], fresh, row_of[cand], pool, tps, threshold, dense)
        dropped += int(red.sum())
        gone = cand[red]
        cur = torch.cat([cur[~torch.isin(cur, gone)], new[~red[len(near):]]])
        owner = torch.searchsorted(torch.as_tensor(offs[1:], device=dev), cur, right=True)
        have = torch.bincount(owner, minlength=G).cpu().numpy()
        deficit = budget - have
        avail = lens - ptr
        take = np.minimum(deficit, avail)
        unused = deficit - take                                   # > 0 only where tokens ran out
        if unused.sum() > 0:
            budget -= unused
            spare = avail - take
            if spare.sum() > 0:
                extra = np.asarray(split_budget(rel, spare, int(unused.sum())), dtype=np.int64)
                budget += extra
                take += extra
    if refill:
        cur, back = _refill(cur, np.minimum(np.asarray(budgets, dtype=np.int64), lens), lens, offs,
                            rel, dev)
        dropped -= back
    cur = torch.sort(cur).values
    owner = torch.searchsorted(torch.as_tensor(offs[1:], device=dev), cur, right=True)
    counts = torch.bincount(owner, minlength=G).tolist()
    kept = [flat[c].to(out_dev) for c in torch.split(cur, counts)]
    return kept, dropped


def _refill(cur: torch.Tensor, share: np.ndarray, lens: np.ndarray, offs: np.ndarray, rel: np.ndarray,
            dev) -> tuple[torch.Tensor, int]:
    """Step 5 of remove_redundancy: (kept flat indices with dropped ones taken back, how many)."""
    G = len(lens)
    target = int(min(int(share.sum()), int(lens.sum())))
    left = target - len(cur)
    if left <= 0:
        return cur, 0
    owner = torch.searchsorted(torch.as_tensor(offs[1:], device=dev), cur, right=True)
    have = torch.bincount(owner, minlength=G).cpu().numpy()
    spare = lens - have                                   # dropped tokens of each group
    take = np.zeros(G, dtype=np.int64)
    for caps in (np.minimum(np.maximum(share - have, 0), spare), spare):
        caps = caps - take
        if left > 0 and caps.sum() > 0:
            add = np.asarray(split_budget(rel, caps, int(min(left, caps.sum()))), dtype=np.int64)
            take += add
            left -= int(add.sum())
    is_kept = torch.zeros(int(offs[-1]), dtype=torch.bool, device=dev)
    is_kept[cur] = True
    back = [torch.nonzero(~is_kept[offs[g]:offs[g + 1]])[:int(take[g]), 0] + int(offs[g])
            for g in range(G) if take[g] > 0]
    return torch.cat([cur, *back]), int(take.sum())


@dataclass
class GroupReport:
    """Per group: which frames it saw, its entropy, relevance, budget and kept count.

    budget is the group's share from split_budget; with redundancy removal, kept can be lower (its
    ranked tokens ran out) or higher (it received budget other groups could not use)."""
    group: int
    frame_indices: list[int]
    timestamps: list[float]
    entropy: float | None = None
    entropy_norm: float | None = None
    relevance: float | None = None
    budget: int = 0
    kept: int = 0
    option_probs: list[float] | None = None
    top: int | None = None               # the answer it favours (entropy.GroupScore.top)


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
    scores: torch.Tensor | None = None       # [n] float32 probe score of each kept token (CPU),
                                             # aligned with gids; None without group passes

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
    ranked = scored.ranked
    features = ranked.features

    last: dict = {}                   # the latest choice, by the groups it was made from

    def choose(done):
        key = tuple(d.group for d in done)
        if key in last:               # Lite's agreeing answer check already chose from these
            return last[key]
        hn = [d.normalized for d in done]
        rel = relevance(hn, relevance_mode, tau)
        order = []
        for d in done:
            p = d.pass_
            order.append(p.gids[torch.argsort(p.scores.cpu(), descending=True, stable=True)])
        caps = [len(o) for o in order]
        budgets = split_budget(rel, caps, int(budget), floor)
        if redundancy_threshold is not None:
            kept, n_red = remove_redundancy(order, budgets, features, float(redundancy_threshold), rel)
        else:
            kept, n_red = [o[:b] for o, b in zip(order, budgets)], 0
        last.clear()
        last[key] = (rel, budgets, kept, n_red)
        return last[key]

    def verify(done):                 # Lite's answer check (entropy.StopRule.check_answer)
        kept = choose(done)[2]
        gids = torch.cat(kept)
        return scored.answer_top(torch.sort(gids).values, hooks)

    done, skipped = scored.evaluate(hooks, verify=verify if scored.stop is not None else None)
    t0 = time.perf_counter()
    rel, budgets, kept, n_red = choose(done)
    reports = []
    for d, r, b, k in zip(done, rel, budgets, kept):
        rep = _group_report(features, d.group, ranked.groups.slices[d.group])
        rep.entropy, rep.entropy_norm = round(d.entropy, 6), round(d.normalized, 6)
        rep.relevance, rep.budget, rep.kept, rep.option_probs = round(float(r), 6), int(b), len(k), d.option_probs
        rep.top = d.top
        reports.append(rep)
    for g in skipped:
        reports.append(_group_report(features, g, ranked.groups.slices[g]))
    reports.sort(key=lambda r: r.group)
    kept_scores = []
    for d, k in zip(done, kept):                 # each kept token's score in its group's pass
        p = d.pass_
        pg = p.gids.cpu()
        kept_scores.append(p.scores.float().cpu()[torch.searchsorted(pg, k.cpu())])
    all_gids = torch.cat(kept)
    order = torch.argsort(all_gids.cpu(), stable=True)
    gids = all_gids[order.to(all_gids.device)]
    scores = torch.cat(kept_scores)[order] if kept_scores else torch.zeros(0)
    features.timer.add("allocate", time.perf_counter() - t0)
    if method is None:
        method = "lite" if scored.stop is not None else "adapttoken"
    groups = ranked.groups
    return Selection(features, ranked.question, ranked.prompt, gids, method, int(budget), reports,
                     skipped, n_red, features.timer.snapshot(), groups.group_size,
                     groups.requested_group_size, scores)


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
