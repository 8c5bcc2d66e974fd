"""adapttoken.models.qwen3_vision_fast against transformers' own Qwen3-VL vision forward (CPU).

A tiny random Qwen3-VL tower (depth 3, deepstack from blocks 0 and 1, 64-entry position table),
weights scaled so outputs are O(1). Grids: several frames of one size, a non-square size, and
several videos of different sizes in one call (runs of equal-length attention segments). The fast
path keeps transformers' token order and only batches the per-frame attention, so float32 and
float64 agree to rounding (tolerances 1e-5 and 1e-12), main features and every deepstack level.
"""
from __future__ import annotations

import math

import pytest
import torch

from adapttoken.models import qwen3_vision_fast as q3f
from adapttoken.training.tiny_families import build_tiny_family

GRIDS = {"one_size": [[3, 8, 8]], "wide": [[2, 6, 10]], "mixed": [[2, 8, 8], [1, 6, 10], [3, 4, 4]]}


def tiny_tower_model():
    """The tiny Qwen3-VL with its vision weights scaled up (also used by the GPU test)."""
    m, _ = build_tiny_family("qwen3_vl", seed=0)
    m.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for name, p in m.model.visual.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_tower_model()


def _pixels(grid, dtype):
    g = torch.Generator().manual_seed(2)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 3 * 2 * 16 * 16, generator=g).to(dtype)


def _reference(model, pv, grid):
    out = model.model.get_video_features(pv, grid)
    cat = lambda x: torch.cat(list(x)) if isinstance(x, (tuple, list)) else x  # noqa: E731
    return cat(out.pooler_output), [cat(d) for d in out.deepstack_features]


@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fast_tower_equals_transformers(model, name, dtype, tol):
    grid = torch.tensor(GRIDS[name])
    m = model.to(dtype)
    pv = _pixels(GRIDS[name], dtype)
    visual = m.model.visual
    assert q3f.is_supported(visual)
    with torch.no_grad():
        ref, ref_deep = _reference(m, pv, grid)
        for matmul in (False, True):
            got, deep = q3f.fast_video_features(visual, pv, grid, compile=False, patch_matmul=matmul)
            assert got.shape == ref.shape and len(deep) == len(ref_deep) == 2
            scale = float(ref.abs().max())
            assert scale > 0.1
            assert float((got - ref).abs().max()) <= tol * max(1.0, scale)
            for a, b in zip(deep, ref_deep):
                assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))
    model.to(torch.float32)


def test_attention_is_batched_per_run_of_equal_frames():
    cu = torch.tensor([0, 64, 128, 192, 252, 312, 328])
    assert q3f._groups(cu) == [(0, 3, 64), (192, 2, 60), (312, 1, 16)]


def test_adapter_uses_the_fast_tower_and_matches(model):
    """Qwen3VLAdapter.encode_pixels: fast path (default) equals the transformers path it replaces."""
    from adapttoken.models.qwen3_vl import Qwen3VLAdapter
    from adapttoken.training.tiny_families import build_tiny_family
    m, proc = build_tiny_family("qwen3_vl", seed=3)
    ad = Qwen3VLAdapter(m, proc)
    frames = torch.randint(0, 256, (4, 128, 96, 3), dtype=torch.uint8)
    resized = ad.resized_size(128, 96)
    pixels = ad.preprocess(frames, resized)
    fast = ad.encode_pixels(pixels, resized)
    ad.use_fast_vision = False
    slow = ad.encode_pixels(pixels, resized)
    assert fast.shape == slow.shape and fast.shape[-1] == m.config.text_config.hidden_size * 3
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


def test_other_towers_are_refused(model):
    assert not q3f.is_supported(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Qwen3-VL vision tower"):
        q3f.fast_video_features(torch.nn.Linear(2, 2), torch.zeros(1, 1), torch.tensor([[1, 1, 1]]))
