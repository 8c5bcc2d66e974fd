"""Redundancy removal and budget flow against a plain reference written with Python loops."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from adapttoken.budget import relevance as relevance_of
from adapttoken.budget import remove_redundancy, split_budget


class _Feats:
    """The two facts remove_redundancy reads, and real embeddings."""

    def __init__(self, emb, tokens_per_slice):
        self.emb, self.tokens_per_slice = emb, tokens_per_slice
        self.num_slices = emb.shape[0] // tokens_per_slice
        self.calls = 0

    def tokens(self, gids, hooks=None, columns=None):
        self.calls += 1
        return self.emb[gids][:, :columns], None


def _cos(unit, a: int, b: int) -> torch.Tensor:
    return (unit[a] * unit[b]).sum()


def reference(ranked, budgets, emb, tps, theta, rel=None, refill=True):
    """The rule, slowly: rounds of (full scan of every location in time order, drop, backfill,
    flow unusable budget to groups with tokens left in proportion to relevance), then (refill)
    budget still unspent back to dropped tokens: each group up to its share, then anywhere."""
    unit = torch.nn.functional.normalize(emb.float(), dim=-1)
    G = len(ranked)
    ranked = [r.tolist() for r in ranked]
    rel = [1.0] * G if rel is None else list(rel)
    budget = [min(int(b), len(r)) for b, r in zip(budgets, ranked)]
    owner = {t: g for g, r in enumerate(ranked) for t in r}
    ptr = [0] * G
    take = list(budget)
    kept: set[int] = set()
    dropped = 0
    while sum(take) > 0:
        for g in range(G):
            for i in range(ptr[g], ptr[g] + take[g]):
                kept.add(ranked[g][i])
            ptr[g] += take[g]
        at = defaultdict(list)
        for t in kept:
            at[t % tps].append(t)
        gone = set()
        for loc in at:
            last = None
            for t in sorted(at[loc], key=lambda x: x // tps):
                if last is not None and bool(_cos(unit, last, t) > theta):
                    gone.add(t)
                else:
                    last = t
        kept -= gone
        dropped += len(gone)
        have = [0] * G
        for t in kept:
            have[owner[t]] += 1
        take = [0] * G
        unused = 0
        spare = [0] * G
        for g in range(G):
            deficit, avail = budget[g] - have[g], len(ranked[g]) - ptr[g]
            take[g] = min(deficit, avail)
            if deficit > avail:
                unused += deficit - avail
                budget[g] -= deficit - avail
            spare[g] = avail - take[g]
        if unused and sum(spare):
            extra = split_budget(rel, spare, unused)
            for g in range(G):
                budget[g] += extra[g]
                take[g] += extra[g]
    share = [min(int(b), len(r)) for b, r in zip(budgets, ranked)]
    left = min(sum(share), sum(len(r) for r in ranked)) - len(kept)
    if refill and left > 0:
        have = [sum(1 for t in r if t in kept) for r in ranked]
        spare = [len(r) - h for r, h in zip(ranked, have)]
        got = [0] * G
        for caps in ([max(0, min(s - h, sp)) for s, h, sp in zip(share, have, spare)], spare):
            caps = [c - t for c, t in zip(caps, got)]
            if left > 0 and sum(caps) > 0:
                add = split_budget(rel, caps, min(left, sum(caps)))
                got = [t + a for t, a in zip(got, add)]
                left -= sum(add)
        for g in range(G):
            back = [t for t in ranked[g] if t not in kept][:got[g]]
            kept |= set(back)
            dropped -= len(back)
    return [[t for t in r if t in kept] for r in ranked], dropped


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    tps = int(rng.choice([1, 2, 3, 4, 6]))
    S = int(rng.integers(2, 50))
    D = int(rng.choice([3, 4, 8]))
    # per location: a base vector; some locations static (tiny noise), others drift or jump
    base = rng.normal(size=(tps, D))
    noise = rng.choice([0.02, 0.2, 0.6, 2.0], size=tps)
    emb = base[None] + noise[None, :, None] * rng.normal(size=(S, tps, D))
    jumps = rng.random((S, tps)) < 0.1
    emb[jumps] = rng.normal(size=(int(jumps.sum()), D))
    emb = torch.tensor(emb.reshape(S * tps, D), dtype=torch.float32)
    G = int(rng.integers(1, min(S, 7) + 1))
    if rng.random() < 0.5:
        slices = [np.arange(g, S, G) for g in range(G)]            # strided
    else:
        slices = np.array_split(rng.permutation(S), G)             # random partition
    ranked = []
    for sl in slices:
        toks = np.array([s * tps + l for s in sl for l in range(tps)], dtype=np.int64)
        if rng.random() < 0.3:
            toks = toks[: int(rng.integers(0, len(toks) + 1))]      # a group with few tokens
        ranked.append(torch.tensor(rng.permutation(toks), dtype=torch.long))
    rel = relevance_of(rng.random(G), str(rng.choice(["linear", "softmax", "even"])), 0.3)
    rel = rel * (rng.random(G) > 0.25)                               # some groups irrelevant
    total = sum(len(r) for r in ranked)
    B = int(rng.integers(1, 2 * total + 3))                          # sometimes more than all tokens
    budgets = split_budget(rel, [len(r) for r in ranked], B, int(rng.integers(0, 4)))
    theta = float(rng.choice([-1.0, 0.0, 0.5, 0.8, 0.9, 0.97, 1.0]))
    return ranked, budgets, emb, tps, theta, rel


def _check_invariants(kept, dropped, ranked, budgets, emb, tps, theta, refill=False):
    unit = torch.nn.functional.normalize(emb.float(), dim=-1)
    allk = [t for k in kept for t in k.tolist()]
    assert len(allk) == len(set(allk))
    for g, k in enumerate(kept):                                     # only the group's own tokens
        assert set(k.tolist()) <= set(ranked[g].tolist())
    if refill:                                                       # the whole budget is spent
        total = sum(len(r) for r in ranked)
        assert len(allk) == min(sum(min(int(b), len(r)) for b, r in zip(budgets, ranked)), total)
        assert len(allk) + dropped <= total
        return
    at = defaultdict(list)
    for t in allk:
        at[t % tps].append(t)
    for loc, ts in at.items():                                       # the rule holds on the result
        ts.sort(key=lambda x: x // tps)
        for a, b in zip(ts, ts[1:]):
            assert not bool(_cos(unit, a, b) > theta)
    spent = len(allk)
    assert spent <= sum(budgets)
    if spent < sum(budgets):                                         # budget left: no token left
        assert spent + dropped == sum(len(r) for r in ranked)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("seed", range(300))
def test_matches_reference_on_random_cases(seed, dense):
    """dense: the walk that masks instead of gathering (the default on CUDA), here on the CPU."""
    ranked, budgets, emb, tps, theta, rel = _random_case(seed)
    rule_only = None
    for refill in (False, True):
        kept, dropped = remove_redundancy(ranked, budgets, _Feats(emb, tps), theta, rel, refill=refill,
                                          dense=dense)
        want, want_dropped = reference(ranked, budgets, emb, tps, theta, rel, refill=refill)
        assert [k.tolist() for k in kept] == want                   # same tokens, in rank order
        assert dropped == want_dropped
        _check_invariants(kept, dropped, ranked, budgets, emb, tps, theta, refill)
        if rule_only is None:
            rule_only = kept
        else:                                                       # refill only adds tokens
            for a, b in zip(rule_only, kept):
                assert set(a.tolist()) <= set(b.tolist())


def test_refill_spends_the_budget_on_the_groups_own_best_tokens():
    """Everything at every location repeats the first slice (the bundled model's background):
    the rule alone keeps one token per location; refill gives each group its share back, its
    highest-ranked dropped tokens first, and the rule's own keeps stay."""
    tps, S, D = 4, 12, 8
    emb = torch.randn(1, tps, D).expand(S, tps, D).reshape(-1, D).clone()
    groups = [torch.tensor([s * tps + l for s in range(g, S, 3) for l in range(tps)]).flip(0)
              for g in range(3)]                                     # later slices rank first
    f = _Feats(emb, tps)
    kept, d = remove_redundancy(groups, [0, 2, 10], f, 0.9, [0.0, 0.2, 0.8], refill=False)
    assert sum(len(k) for k in kept) == tps and d == S * tps - tps   # slice 0's tokens only
    # the rule's flow gave group 0's spare tokens the budget groups 1-2 could not use: 4 kept
    # there; the 8 left go to the deficits (2 and 10) by relevance 0.2 : 0.8 -> 2 and 6
    kept, d = remove_redundancy(groups, [0, 2, 10], f, 0.9, [0.0, 0.2, 0.8], refill=True)
    assert [len(k) for k in kept] == [4, 2, 6] and d == S * tps - 12
    assert kept[1].tolist() == groups[1][:2].tolist()               # each group's best first
    assert kept[2].tolist() == groups[2][:6].tolist()
    assert kept[0].tolist() == sorted(range(tps), key=groups[0].tolist().index)   # the rule's keeps


@pytest.mark.parametrize("dense", [False, True])
def test_static_location_longer_than_any_round_cap(dense):
    # 700 slices of one static location (identical up to noise) and one drifting location: the
    # old implementation resolved one static repeat per round and stopped after 256 rounds
    torch.manual_seed(1)
    S, D = 700, 16
    emb = torch.zeros(S, 2, D)
    emb[:, 0] = torch.randn(D) + 1e-3 * torch.randn(S, D)
    emb[:, 1] = torch.randn(S, D)
    emb = emb.reshape(-1, D)
    ranked = [torch.cat([torch.arange(0, 2 * S, 2), torch.arange(1, 2 * S, 2)])]  # static first
    feats = _Feats(emb, 2)
    kept, dropped = remove_redundancy(ranked, [600], feats, 0.9, refill=False, dense=dense)
    want, want_dropped = reference(ranked, [600], emb, 2, 0.9, refill=False)
    assert kept[0].tolist() == want[0]
    assert dropped == want_dropped == S - 1                          # every static repeat
    k = kept[0]
    assert (k % 2 == 0).sum() == 1 and len(k) == 600                 # budget spent on location 1


@pytest.mark.parametrize("dense", [False, True])
def test_threshold_edges_are_strict(dense):
    # one-hot embeddings: cosines are exactly 0 or 1
    D, tps = 4, 1
    onehot = torch.eye(D)
    seq = [0, 0, 1, 1, 0, 2, 2, 3]                                   # one location over 8 slices
    emb = onehot[seq]
    emb[6] = -onehot[2]                                              # slice 6: cosine -1 with slice 5
    ranked = [torch.arange(len(seq))]
    f = _Feats(emb, tps)
    # theta = 1: nothing exceeds 1, nothing dropped
    kept, d = remove_redundancy(ranked, [8], f, 1.0, refill=False, dense=dense)
    assert d == 0 and kept[0].tolist() == list(range(8))
    # theta = 0: exact repeats (cos 1) go; orthogonal (cos 0 = theta) and opposite stay
    kept, d = remove_redundancy(ranked, [8], f, 0.0, refill=False, dense=dense)
    assert sorted(kept[0].tolist()) == [0, 2, 4, 5, 6, 7] and d == 2
    # theta = -1: everything but opposite vectors is redundant with the last kept
    kept, d = remove_redundancy(ranked, [8], f, -1.0, refill=False, dense=dense)
    assert sorted(kept[0].tolist()) == [0] and d == 7
    for theta in (1.0, 0.0, -1.0):
        k, d = remove_redundancy(ranked, [8], f, theta, refill=False, dense=dense)
        assert ([x.tolist() for x in k], d) == reference(ranked, [8], emb, tps, theta, refill=False)


@pytest.mark.parametrize("dense", [False, True])
def test_chain_is_judged_against_the_last_kept_token(dense):
    # A, B ~ A, C far from B but close to A, D far from A but close to C: a scan over time keeps
    # A and D (B and C repeat A; D does not repeat A, the last kept one)
    # at 0, +20, -20 and -40 degrees: cos 20 deg = 0.94 > 0.9, cos 40 deg = 0.77
    ang = torch.tensor([0.0, 20.0, -20.0, -40.0]) * math.pi / 180
    e = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    f = _Feats(e, 1)
    kept, d = remove_redundancy([torch.arange(4)], [4], f, 0.9, refill=False, dense=dense)
    assert sorted(kept[0].tolist()) == [0, 3] and d == 2


def test_unusable_budget_flows_by_relevance():
    torch.manual_seed(0)
    tps, S, D = 4, 40, 64
    emb = torch.randn(S, tps, D)                                     # random: cosines far below 0.99
    emb[:, 0] = torch.randn(D)                                       # location 0 identical throughout
    emb = emb.reshape(-1, D)
    g0 = torch.tensor([s * tps for s in range(10)])                  # group 0: only static tokens
    g1 = torch.tensor([s * tps + l for s in range(10, 25) for l in (1, 2, 3)])
    g2 = torch.tensor([s * tps + l for s in range(25, 40) for l in (1, 2, 3)])
    f = _Feats(emb, tps)
    kept, d = remove_redundancy([g0, g1, g2], [10, 10, 10], f, 0.99, [0.6, 0.3, 0.1], refill=False)
    # group 0 keeps 1 of 10; its 9 unused tokens split 3:1 -> 6.75 / 2.25 -> 7 / 2
    assert [len(k) for k in kept] == [1, 17, 12] and d == 9
    # the relevant group has only 13 tokens: it takes 3, the irrelevant one the other 6
    g1s = g1[:13]
    kept, d = remove_redundancy([g0, g1s, g2], [10, 10, 10], f, 0.99, [0.6, 0.3, 0.0], refill=False)
    assert [len(k) for k in kept] == [1, 13, 16]
    # budget larger than all tokens: everything not redundant is kept
    kept, d = remove_redundancy([g0, g1, g2], [30, 45, 60], f, 0.99, [1.0, 1.0, 1.0], refill=False)
    assert [len(k) for k in kept] == [1, 45, 45] and d == 9
    for rel in ([0.6, 0.3, 0.1], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]):
        got, dd = remove_redundancy([g0, g1s, g2], [10, 10, 10], f, 0.99, rel, refill=False)
        want, wd = reference([g0, g1s, g2], [10, 10, 10], emb, tps, 0.99, rel, refill=False)
        assert [k.tolist() for k in got] == want and dd == wd


@pytest.mark.parametrize("dense", [False, True])
def test_backfill_can_make_a_kept_token_redundant(dense):
    # group 0 keeps slice 4 at location 0; group 1's static slice 0 is dropped and backfilled by its
    # slice 3, which repeats slice 4: slice 4 goes, and group 0 backfills in turn
    D = 8
    torch.manual_seed(3)
    v = torch.randn(6, D)
    e = v.clone()
    e[1] = v[0]                                                      # slice 1 repeats slice 0
    e[3] = v[4]                                                      # slice 3 repeats slice 4
    f = _Feats(e, 1)
    ranked = [torch.tensor([4, 5, 2]), torch.tensor([0, 1, 3])]
    kept, d = remove_redundancy(ranked, [1, 2], f, 0.9, [1.0, 1.0], refill=False, dense=dense)
    want, wd = reference(ranked, [1, 2], e, 1, 0.9, [1.0, 1.0], refill=False)
    assert [k.tolist() for k in kept] == want and d == wd
    assert want == [[5], [0, 3]] and wd == 2


def test_runs_on_empty_and_tiny_inputs():
    f = _Feats(torch.randn(4, 3), 2)
    assert remove_redundancy([], [], f, 0.9) == ([], 0)
    kept, d = remove_redundancy([torch.zeros(0, dtype=torch.long), torch.tensor([3])], [0, 1], f, 0.9)
    assert [k.tolist() for k in kept] == [[], [3]] and d == 0
