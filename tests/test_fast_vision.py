"""adapttoken.models.qwen_vision_fast against transformers' own Qwen2.5-VL vision forward (CPU).

Tiny random Qwen2.5-VL (vision depth 4, window 112 px, full attention at blocks 1 and 3). Frame sizes
give exact tilings (224x224: 2x2 windows of 8x8 patches) and ragged ones (252x308: 18x22 patches =
rows 8+8+2, cols 8+8+6), several slices per video and several videos in one call.

Tolerances: float32 max |diff| <= 1e-5 and float64 <= 1e-12 (on this CPU both were 0: same
operations in the same order, only the attention calls batched). bf16 (seen: 0 here as well): both
paths are compared with a float64 run of the same weights, and the fast path's error must be within
1.5x (+0.01 absolute) of transformers' own bf16 error, max and mean; the direct bf16 diff between
the two paths is bounded by 5% of the output's max |value|. On an H100 (bench fp32 check, TF32 off,
patch embedding as a matmul) float32 differed by 3.6e-5 on outputs of max 7.7.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from adapttoken.models import qwen_vision_fast as qvf
from adapttoken.models.qwen_vision_fast import build_layout, fast_video_features, is_supported

EXACT = [[2, 16, 16]]                                  # 4 frames of 224x224
RAGGED = [[3, 18, 22]]                                 # 6 frames of 252x308
MIXED = [[2, 16, 16], [1, 18, 22], [3, 18, 22], [1, 4, 6]]  # several videos, one 56x84 (one window)


def _tiny_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [1, 1, 2]},
                         bos_token_id=0, eos_token_id=1, pad_token_id=0),
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=32,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[1, 3], tokens_per_second=2),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().requires_grad_(False)
    # larger-than-default random weights so outputs are O(1) and the tolerances mean something
    g = torch.Generator().manual_seed(1)
    for name, p in model.model.visual.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:  # RMSNorm weights
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def _inputs(grid, seed=0):
    grid = torch.tensor(grid)
    n = int(grid.prod(-1).sum())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=g), grid


def _reference(model, pv, grid):
    with torch.no_grad():
        out = model.model.get_video_features(pv, grid).pooler_output
    return torch.cat(list(out)) if isinstance(out, (tuple, list)) else out


def _set_dtype(model, dtype):
    model.to(dtype)
    return model


def test_is_supported(model):
    assert is_supported(model.model.visual)
    assert not is_supported(model.model.language_model)
    assert not is_supported(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a Qwen2.5-VL vision tower"):
        fast_video_features(torch.nn.Linear(2, 2), torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]))


@pytest.mark.parametrize("grid", [EXACT, RAGGED, MIXED], ids=["exact", "ragged", "mixed"])
def test_float32_matches_get_video_features(model, grid):
    _set_dtype(model, torch.float32)
    pv, g = _inputs(grid)
    ref = _reference(model, pv, g)
    out = fast_video_features(model.model.visual, pv, g)
    assert out.shape == ref.shape == (int(g.prod(-1).sum()) // 4, 32)
    assert out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    assert ref.abs().max().item() > 0.5  # outputs are not vanishingly small
    assert err <= 1e-5, err


@pytest.mark.parametrize("grid", [RAGGED, MIXED], ids=["ragged", "mixed"])
def test_float64_is_exact(model, grid):
    _set_dtype(model, torch.float64)
    try:
        pv, g = _inputs(grid, seed=3)
        ref = _reference(model, pv.double(), g)
        out = fast_video_features(model.model.visual, pv.double(), g)
        assert (out - ref).abs().max().item() <= 1e-12
    finally:
        _set_dtype(model, torch.float32)


@pytest.mark.parametrize("grid", [EXACT, MIXED], ids=["exact", "mixed"])
def test_bfloat16_within_bf16_error(model, grid):
    pv, g = _inputs(grid, seed=5)
    _set_dtype(model, torch.float64)
    truth = _reference(model, pv.double(), g)
    _set_dtype(model, torch.bfloat16)
    try:
        hf = _reference(model, pv, g).double()
        fast = fast_video_features(model.model.visual, pv, g)
        assert fast.dtype == torch.bfloat16
        fast = fast.double()
    finally:
        _set_dtype(model, torch.float32)
    hf_err, fast_err = (hf - truth).abs(), (fast - truth).abs()
    assert fast_err.max() <= 1.5 * hf_err.max() + 1e-2, (fast_err.max(), hf_err.max())
    assert fast_err.mean() <= 1.5 * hf_err.mean() + 1e-3, (fast_err.mean(), hf_err.mean())
    assert (fast - hf).abs().max() <= 0.05 * truth.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotary_eager_is_bitwise_the_plain_formula(dtype):
    g = torch.Generator().manual_seed(7)
    n, heads, d = 50, 3, 16
    qkv = (4 * torch.randn(n, 3, heads, d, generator=g)).to(dtype)
    pos = torch.randn(n, 1, d // 4, generator=g) * 30
    freqs = torch.cat([pos, pos * 0.3, pos, pos * 0.3], dim=-1)   # not symmetric halves on purpose
    cos, sin = freqs.cos(), freqs.sin()
    h = d // 2
    plain = qvf._rotary_plain(qkv, cos, sin)
    eager = qvf._rotary_eager(qkv, cos, -sin[..., :h], sin[..., h:].contiguous())
    assert plain.dtype == eager.dtype == dtype and plain.shape == (2, n, heads, d)
    assert torch.equal(plain, eager)
    # and the plain formula is transformers' own
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    q, k = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos[:, 0], sin[:, 0])
    assert torch.equal(plain[0], q) and torch.equal(plain[1], k)


def test_patch_matmul_path(model):
    """The CUDA default (patch embedding as one matmul), run here on CPU."""
    _set_dtype(model, torch.float32)
    pv, g = _inputs(MIXED, seed=9)
    ref = _reference(model, pv, g)
    out = fast_video_features(model.model.visual, pv, g, patch_matmul=True)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.skipif(not os.environ.get("ADAPTTOKEN_TEST_COMPILE"),
                    reason="torch.compile takes ~40 s on CPU: set ADAPTTOKEN_TEST_COMPILE=1")
def test_compiled_path(model):
    _set_dtype(model, torch.float32)
    for grid in (EXACT, RAGGED, MIXED):   # the second shape recompiles with dynamic N, then no more
        pv, g = _inputs(grid, seed=11)
        ref = _reference(model, pv, g)
        out = fast_video_features(model.model.visual, pv, g, compile=True)
        assert (out - ref).abs().max().item() <= 1e-5


def test_default_compile_falls_back_to_eager(model, monkeypatch):
    """Where compile is the default (CUDA) and fails, warn once and run eager; compile=True raises."""
    _set_dtype(model, torch.float32)
    monkeypatch.setattr(qvf, "_COMPILED", {})
    monkeypatch.setattr(qvf, "_compile_by_default",
                        lambda device, key="failed": not qvf._COMPILED.get(key))

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(qvf, "_block_compiled", broken)
    pv, g = _inputs(RAGGED)
    ref = _reference(model, pv, g)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = fast_video_features(model.model.visual, pv, g)
    assert (out - ref).abs().max().item() <= 1e-5
    assert qvf._COMPILED["failed"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast_video_features(model.model.visual, pv, g)       # eager now, no second warning
    with pytest.raises(RuntimeError, match="no compiler"):
        fast_video_features(model.model.visual, pv, g, compile=True)


def test_batched_attention_call_count(model, monkeypatch):
    """One sdpa call per window-length class (4 for the ragged tiling, 1 exact) and per slice size."""
    _set_dtype(model, torch.float32)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, *a, **k):
        calls.append(tuple(q.shape))
        return real(q, *a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    for grid, per_window_block in ((EXACT, 1), (RAGGED, 4)):
        calls.clear()
        pv, g = _inputs(grid)
        fast_video_features(model.model.visual, pv, g)
        # depth 4: blocks 0, 2 windowed; 1, 3 full attention (one slice size per video here)
        assert len(calls) == 2 * per_window_block + 2, calls
    # ragged 18x22 patches: windows of 8x8, 8x6, 2x8, 2x6 patches; slices of 396 patches
    assert sorted({c[2] for c in calls}) == [12, 16, 48, 64, 396]


def test_layout_groups_and_permutation():
    lay = build_layout(torch.tensor(MIXED), 2, 112, 14)
    n = sum(t * h * w for t, h, w in MIXED)
    assert lay.n_patches == n
    assert sorted(lay.win_units.tolist()) == list(range(n // 4))
    assert torch.equal(lay.win_units[lay.inv_units], torch.arange(n // 4))
    assert sum(c * L for _, c, L in lay.win_groups) == n
    assert sum(c * L for _, c, L in lay.slice_groups) == n
    assert [L for _, _, L in lay.win_groups] == sorted((L for _, _, L in lay.win_groups), reverse=True)
    assert sorted({L for _, _, L in lay.slice_groups}) == [24, 256, 396]
    assert torch.equal(lay.to_window[lay.to_slice], torch.arange(n))
    # exact tiling of one size: window layout is transformers' order and slices are contiguous
    lay1 = build_layout(torch.tensor(EXACT), 2, 112, 14)
    assert lay1.to_slice is None and lay1.win_groups == ((0, 8, 64),) and lay1.slice_groups == ((0, 2, 256),)


def test_bad_inputs(model):
    pv, g = _inputs(EXACT)
    with pytest.raises(ValueError, match="rows"):
        fast_video_features(model.model.visual, pv[:-4], g)
    with pytest.raises(ValueError, match="multiples of the merge size"):
        fast_video_features(model.model.visual, torch.zeros(15, 1176), torch.tensor([[1, 3, 5]]))


def test_bench_smoke(tmp_path):
    from adapttoken.bench import vision

    out = tmp_path / "v.json"
    vision.main(["--tiny", "--device", "cpu", "--frames", "2", "--size", "224,252x308", "--iters", "1",
                 "--warmup", "0", "--no-compile", "--out", str(out)])
    assert "fast_compiled" not in json.loads(out.read_text())["shapes"][0]["paths"]
    res = json.loads(out.read_text())
    assert res["fp32_check"]["max_abs"] <= 1e-5
    for shape in res["shapes"]:
        assert shape["paths"]["hf_sdpa"]["ms_median"] > 0
        fast = shape["paths"]["fast_eager"]
        assert fast["ms_median"] > 0 and fast["tflops"] > 0 and "speedup_vs_hf" in fast
        assert fast["diff_vs_hf"]["max_rel_to_ref_max"] < 0.05  # bf16


def test_compiled_mlp_adds_the_biases_in_the_activation(model):
    """The compiled path's MLP (`_mlp`, PERF_NOTES item 30): bias-free matmuls, the gate/up biases
    added before the activation, equal to the module's own forward (float64: to rounding); a hooked
    layer keeps the module's forward, so its hook runs."""
    mlp = model.model.visual.blocks[0].mlp.double()
    try:
        assert mlp.gate_proj.bias is not None and mlp.up_proj.bias is not None
        h = torch.randn(37, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
        torch.testing.assert_close(qvf._mlp(mlp, h), mlp(h), rtol=1e-12, atol=1e-12)
        seen = []
        handle = mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        try:
            torch.testing.assert_close(qvf._mlp(mlp, h), mlp(h), rtol=1e-12, atol=1e-12)
        finally:
            handle.remove()
        assert len(seen) == 2          # _mlp's call ran the hook, as the module's own call did
    finally:
        mlp.float()
