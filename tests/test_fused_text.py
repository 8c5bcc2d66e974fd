"""fused_text: the fused RMSNorm / SiLU-MLP forwards installed on a Qwen2.5-VL text model.

Off CUDA (the default) they run transformers' own formula: bit-identical logits. The compiled
kernels (what CUDA runs) are checked on the CPU in float32 when ADAPTTOKEN_TEST_COMPILE=1."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from adapttoken.models import fused_text as ft
from adapttoken.models.fused_text import FusedText


@pytest.fixture(scope="module")
def model():
    from adapttoken.training.tiny import build_tiny_model
    m, _ = build_tiny_model(seed=3, layers=3, vision_depth=1)
    return m.eval().requires_grad_(False)


def _logits(model, x, pos):
    with torch.inference_mode():
        return model(inputs_embeds=x, position_ids=pos, use_cache=False).logits


def _inputs(model, n=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = model.config.text_config.hidden_size
    x = torch.randn(1, n, D, generator=g).to(dtype)
    pos = torch.arange(n).expand(3, 1, n)
    return x, pos


def test_install_covers_every_norm_and_mlp_and_uninstall_restores(model):
    lm = model.model.language_model
    f = FusedText(lm).install()
    try:
        assert len(f.norms) == 2 * len(lm.layers) + 1 and len(f.mlps) == len(lm.layers)
        assert all("forward" in m.__dict__ for m in f.norms + f.mlps)
        assert not any("forward" in m.__dict__ for m in model.model.visual.modules())
    finally:
        f.uninstall()
    assert not any("forward" in m.__dict__ for m in f.norms + f.mlps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_is_bitwise_transformers(model, dtype):
    model.to(dtype)
    try:
        x, pos = _inputs(model, dtype=dtype)
        ref = _logits(model, x, pos)
        f = FusedText(model.model.language_model).install()     # enabled=None: CPU runs eager
        try:
            assert torch.equal(_logits(model, x, pos), ref)
            f.enabled = False
            assert torch.equal(_logits(model, x, pos), ref)
        finally:
            f.uninstall()
    finally:
        model.to(torch.float32)


def test_adapter_installs_it(tiny_adapter):
    ad = tiny_adapter
    assert ad.fused_text.installed and ad.fuse_text is None
    ad.fuse_text = False
    assert ad.fused_text.enabled is False
    ad.fuse_text = None


def test_failed_compile_warns_once_and_runs_eager(model, monkeypatch):
    monkeypatch.setattr(ft, "_STATE", {"failed": False})

    def broken(fn):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ft, "_compiled", broken)
    x, pos = _inputs(model)
    ref = _logits(model, x, pos)
    f = FusedText(model.model.language_model, enabled=True).install()
    try:
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            out = _logits(model, x, pos)
        assert torch.equal(out, ref) and ft._STATE["failed"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(_logits(model, x, pos), ref)
    finally:
        f.uninstall()


@pytest.mark.skipif(not os.environ.get("ADAPTTOKEN_TEST_COMPILE"),
                    reason="torch.compile takes ~30 s on CPU: set ADAPTTOKEN_TEST_COMPILE=1")
def test_compiled_kernels_match_eager(model):
    f = FusedText(model.model.language_model, enabled=True).install()
    try:
        for n in (37, 5, 64):           # dynamic shapes: one graph for every length
            x, pos = _inputs(model, n=n, seed=n)
            f.enabled = False
            ref = _logits(model, x, pos)
            f.enabled = True
            out = _logits(model, x, pos)
            assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    finally:
        f.uninstall()


def test_rotary_wrapper_is_inert_outside_this_models_forward(model, monkeypatch):
    """The module-global rotary wrapper runs the original function unless this text model's forward
    is running with fusing on (enabled=True here; `_compiled` replaced by a recorder)."""
    import sys

    lm = model.model.language_model
    f = FusedText(lm, enabled=True).install()
    try:
        assert f.rotary
        mod = sys.modules[type(f.attns[0]).__module__]
        orig = mod.apply_rotary_pos_emb.__wrapped__
        used = []
        monkeypatch.setattr(ft, "_compiled", lambda fn: used.append(fn) or fn)
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
        cos, sin = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)
        a = mod.apply_rotary_pos_emb(q, k, cos, sin)
        b = orig(q, k, cos, sin)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and used == []
        x, pos = _inputs(model)
        ref = None
        f.enabled = False
        ref = _logits(model, x, pos)
        assert used == []
        f.enabled = True
        out = _logits(model, x, pos)                  # inside the forward: the wrapper is used
        assert used.count(orig) == len(lm.layers) and torch.equal(out, ref)
        assert ft._ACTIVE.get() is None               # reset after the forward
    finally:
        f.uninstall()
