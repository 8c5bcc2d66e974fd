"""Entropy, relevance, budget split and redundancy removal on hand-made inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapttoken.budget import relevance, remove_redundancy, split_budget
from adapttoken.entropy import StopRule, response_entropy
from adapttoken.errors import InputError


def test_entropy_over_option_letters():
    V = 50
    logits = torch.full((V,), -1e4)
    # letters A,B,C,D with two token variants each: A=(1,11) B=(2,12) C=(3,13) D=(4,14)
    opts = [[1, 11], [2, 12], [3, 13], [4, 14]]
    logits[[1, 2, 3, 4]] = 0.0                                  # uniform over the four letters
    h, hmax, p = response_entropy(logits, opts)
    assert hmax == pytest.approx(math.log(4))
    assert h == pytest.approx(math.log(4), abs=1e-6)
    assert p == pytest.approx([0.25] * 4, abs=1e-6)
    # all mass on ' B' (variant 12): entropy 0, P(B) = 1 (variants are summed)
    logits = torch.full((V,), -1e4)
    logits[12] = 10.0
    h, _, p = response_entropy(logits, opts)
    assert h == pytest.approx(0.0, abs=1e-6)
    assert p[1] == pytest.approx(1.0)
    # two letters at 1/2 each, split across variants: H = ln 2
    logits = torch.full((V,), -1e4)
    logits[[1, 11]] = math.log(0.25)
    logits[2] = math.log(0.5)
    h, _, p = response_entropy(logits, opts)
    assert h == pytest.approx(math.log(2), abs=1e-5)
    assert p[0] == pytest.approx(0.5, abs=1e-5)
    # probability mass on other tokens is renormalised away
    logits[30] = 20.0
    h2, _, _ = response_entropy(logits, opts)
    assert h2 == pytest.approx(h, abs=1e-4)


def test_entropy_full_vocabulary():
    V = 64
    h, hmax, p = response_entropy(torch.zeros(V))
    assert p is None and hmax == pytest.approx(math.log(V)) and h == pytest.approx(math.log(V), 1e-6)
    x = torch.zeros(V)
    x[5] = 100
    assert response_entropy(x)[0] == pytest.approx(0.0, abs=1e-6)


def test_relevance_modes():
    hn = [0.0, 0.5, 1.0]
    assert relevance(hn, "linear").tolist() == [1.0, 0.5, 0.0]
    sm = relevance(hn, "softmax", tau=0.5)
    assert sm.sum() == pytest.approx(1.0) and sm[0] > sm[1] > sm[2]
    assert relevance(hn, "even").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(InputError, match="relevance"):
        relevance(hn, "bogus")


@pytest.mark.parametrize("seed", range(20))
def test_split_budget_sums_and_caps(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    rel = rng.random(n) * (rng.random(n) > 0.3)
    cap = rng.integers(0, 300, n)
    B = int(rng.integers(1, 2000))
    floor = int(rng.integers(0, 40))
    out = np.array(split_budget(rel, cap, B, floor))
    assert out.sum() == min(B, cap.sum())
    assert (out <= cap).all() and (out >= 0).all()
    if floor and min(B, cap.sum()) >= floor * n:
        assert (out >= np.minimum(cap, floor)).all()


def test_split_budget_proportional_and_overflow():
    # proportional: 3:1 of 400 tokens, plenty of room
    assert split_budget([0.75, 0.25], [1000, 1000], 400) == [300, 100]
    # the confident group is capped at its 120 tokens; the overflow goes to the other
    assert split_budget([0.9, 0.1], [120, 1000], 400) == [120, 280]
    # zero relevance everywhere: even split
    assert split_budget([0, 0, 0, 0], [100] * 4, 200) == [50] * 4
    with pytest.raises(InputError, match="budget"):
        split_budget([1.0], [10], 0)


class _S:
    def __init__(self, hn, top=0):
        self.normalized, self.top = hn, top


def test_stop_rule():
    S = _S
    r = StopRule(0.2, min_groups=2, confirm=1)
    assert not r.should_stop([S(0.1)])                          # too few groups
    assert r.should_stop([S(0.9), S(0.1)])
    assert not r.should_stop([S(0.9), S(0.5)])
    with pytest.raises(InputError, match="threshold"):
        StopRule(1.5)
    with pytest.raises(InputError, match="confirm"):
        StopRule(0.2, confirm=0)


def test_stop_rule_waits_for_a_second_confident_group_that_agrees():
    S = _S
    r = StopRule(0.2)                                           # the default asks for two
    assert r.confirm == 2
    assert not r.should_stop([S(0.1, top=2)])                   # one confident group is not enough
    assert not r.should_stop([S(0.1, top=2), S(0.1, top=1)])    # a second one that disagrees
    # agreement with any earlier confident group counts, adjacent or not
    assert r.should_stop([S(0.1, top=2), S(0.1, top=1), S(0.9, top=2), S(0.15, top=2)])
    assert r.should_stop([S(0.9, top=3), S(0.1, top=3), S(0.05, top=3)])
    # an agreeing group above the threshold does not confirm
    assert not r.should_stop([S(0.3, top=3), S(0.1, top=3)])
    # the stop is on the latest group only: an unconfident last group never stops
    assert not r.should_stop([S(0.1, top=3), S(0.1, top=3), S(0.5, top=3)])
    assert StopRule(0.2, confirm=3).should_stop([S(0.1), S(0.1), S(0.1)])
    assert not StopRule(0.2, confirm=3).should_stop([S(0.1), S(0.1)])


class _Feats:
    """Plain container with the two facts remove_redundancy reads and real embeddings."""

    def __init__(self, emb, tokens_per_slice):
        self.emb, self.tokens_per_slice = emb, tokens_per_slice
        self.num_slices = emb.shape[0] // tokens_per_slice

    def tokens(self, gids, hooks=None, columns=None):
        return self.emb[gids][:, :columns], None


def test_redundancy_removal_drops_static_tokens_and_backfills():
    torch.manual_seed(0)
    S, T, D = 6, 4, 16                      # 6 slices of 4 locations
    base = torch.randn(T, D)
    emb = torch.randn(S, T, D)
    emb[:, 0] = base[0] + 0.01 * torch.randn(S, D)   # location 0 is static background
    feats = _Feats(emb.reshape(-1, D), T)
    # one group, ranked: location 0 of every slice first, then the rest
    static = torch.tensor([s * T for s in range(S)])
    others = torch.tensor([s * T + l for s in range(S) for l in range(1, T)])
    ranked = [torch.cat([static, others])]
    kept, dropped = remove_redundancy(ranked, [8], feats, threshold=0.9)
    k = kept[0]
    assert len(k) == 8                                     # budget kept through backfill
    assert dropped == 5                                    # 5 repeats of the static location
    assert (k % T == 0).sum() == 1 and 0 in k.tolist()     # only its first occurrence stays
    # threshold above every similarity: nothing dropped
    kept, dropped = remove_redundancy(ranked, [8], feats, threshold=1.01)
    assert dropped == 0 and torch.equal(kept[0], ranked[0][:8])


def test_redundancy_chain_compares_with_last_kept():
    # a slow drift: each step is similar to the previous one, but the ends are far apart
    D, S = 8, 5
    ang = torch.linspace(0, math.pi / 2, S)
    emb = torch.zeros(S, 1, D)
    emb[:, 0, 0], emb[:, 0, 1] = torch.cos(ang), torch.sin(ang)
    feats = _Feats(emb.reshape(-1, D), 1)
    ranked = [torch.arange(S)]
    # neighbours: cos(22.5 deg) = 0.924 > 0.9; two steps: cos(45) = 0.707
    kept, dropped = remove_redundancy(ranked, [S], feats, threshold=0.9, refill=False)
    assert sorted(kept[0].tolist()) == [0, 2, 4]
    assert dropped == 2
