"""The question suffix's attention (models/suffix_attention.py): inside `suffix_pass()`, q query
rows against L > q keys with a lower-right causal bias and GQA in one kernel; everywhere else
transformers' sdpa. Checked against an eager reference and end to end on the group passes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import adapttoken as at
from adapttoken.models import suffix_attention as sa

from videos import write_video


def _eager(q, k, v, scale):
    """Reference: every key/value head repeated, lower-right causal mask, float64 softmax."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    n, L = q.shape[2], k.shape[2]
    s = (q.double() @ k.transpose(-1, -2)) * scale
    allowed = torch.arange(L)[None, :] <= (torch.arange(n)[:, None] + L - n)
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)          # [B, n, H, hd] as transformers returns


def test_lower_right_path_matches_eager_and_transformers_sdpa(tiny_adapter):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    attn = tiny_adapter.text_model.layers[0].self_attn
    assert attn.num_key_value_groups > 1                 # the tiny model has GQA, as the 7B
    g = torch.Generator().manual_seed(0)
    H, Hkv, hd, n, L = 4, 2, 16, 7, 45
    q = torch.randn(1, H, n, hd, generator=g)
    k, v = torch.randn(1, Hkv, L, hd, generator=g), torch.randn(1, Hkv, L, hd, generator=g)
    mask = (torch.arange(L)[None, :] <= (torch.arange(n)[:, None] + L - n))[None, None]
    before = sa.stats["lower_right_calls"]
    with sa.suffix_pass():
        # the mask argument is what transformers built; the lower-right path ignores it
        fast, _ = sa._attention(attn, q, k, v, None, scaling=0.25)
    assert sa.stats["lower_right_calls"] == before + 1
    ref = _eager(q, k, v, 0.25)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)
    plain, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    # outside suffix_pass() (and for a prefill, q == L) it is transformers' own function
    out, _ = sa._attention(attn, q, k, v, mask, scaling=0.25)
    assert torch.equal(out, plain)
    with sa.suffix_pass():
        qq = torch.randn(1, H, L, hd, generator=g)
        out, _ = sa._attention(attn, qq, k, v, None, scaling=0.25, is_causal=True)
        assert torch.equal(out, sdpa_attention_forward(attn, qq, k, v, None, scaling=0.25,
                                                       is_causal=True)[0])
    assert sa.stats["lower_right_calls"] == before + 1


def test_installed_only_over_sdpa(tiny_adapter, tiny):
    assert tiny_adapter.fast_suffix
    assert tiny_adapter.model.config._attn_implementation == sa.ATTENTION
    from adapttoken.training.tiny import build_tiny_model
    eager, _ = build_tiny_model(seed=0, layers=2, vision_depth=1, attn="eager")
    assert not sa.install(eager) and eager.config._attn_implementation == "eager"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 64, width=112, height=84, fps=8)


def test_group_passes_agree_with_and_without_the_lower_right_path(tiny_model, clip):
    cfg = at.AdaptTokenConfig(num_frames=64, group_size=4, budget=24, max_pixels=56 * 56,
                              min_pixels=56 * 56, max_new_tokens=3)
    ad = tiny_model.adapter
    runs = {}
    try:
        for fast in (False, True):
            ad.fast_suffix = fast
            before = sa.stats["lower_right_calls"]
            res = at.ask(tiny_model, clip, "What is shown?", options=("a", "b", "c"), config=cfg,
                         fresh_features=True)
            runs[fast] = (res, sa.stats["lower_right_calls"] - before)
    finally:
        ad.fast_suffix = True
    (slow, n_slow), (fast, n_fast) = runs[False], runs[True]
    # every group pass's suffix went through it: one call per layer per group
    assert n_slow == 0 and n_fast == len(fast.groups) * ad.num_layers
    np.testing.assert_allclose([g.entropy for g in fast.groups], [g.entropy for g in slow.groups],
                               atol=1e-5)
    assert fast.kept_tokens == slow.kept_tokens and fast.answer == slow.answer


def test_under_a_dispatch_mode_it_takes_transformers_path(tiny_adapter):
    """torch's CausalBias (a tensor subclass) cannot be made under a TorchDispatchMode (memory or
    FLOP counters): the suffix then runs transformers' masked sdpa, with the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    attn = tiny_adapter.text_model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 16, generator=g)
    k, v = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    mask = (torch.arange(30)[None, :] <= (torch.arange(5)[:, None] + 25))[None, None]
    before = sa.stats["lower_right_calls"]
    with Passthrough(), sa.suffix_pass():
        out, _ = sa._attention(attn, q, k, v, mask, scaling=0.25)
    assert sa.stats["lower_right_calls"] == before          # the fallback ran
    torch.testing.assert_close(out, sdpa_attention_forward(attn, q, k, v, mask, scaling=0.25)[0])
