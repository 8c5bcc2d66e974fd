"""The CUDA-only paths, run on a GPU machine (`python tests/gpu/run.py`; skipped without CUDA):
the compiled vision tower, the fused language-model kernels, the prefix key/value cache on the device
and in its host tier, and warm vs cold caches. Each is checked against the path it replaces."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on a GPU machine: python tests/gpu/run.py)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: shared builders

import adapttoken as at                                              # noqa: E402
from adapttoken.demo import demo_config                              # noqa: E402
from adapttoken.defaults import BUNDLED_MODEL                        # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# -- compiled vision tower ---------------------------------------------------------------------

def test_compiled_vision_tower_matches_transformers_on_cuda():
    from test_fast_vision import EXACT, MIXED, RAGGED, _inputs, _reference, _tiny_model

    from adapttoken.models import qwen_vision_fast as qvf
    model = _tiny_model().to(CUDA)
    for grid in (EXACT, RAGGED, MIXED):
        pv, g = _inputs(grid, seed=11)
        pv, g = pv.to(CUDA), g.to(CUDA)
        ref = _reference(model, pv, g)
        out = qvf.fast_video_features(model.model.visual, pv, g)        # CUDA default: compiled
        assert qvf._COMPILED and not qvf._COMPILED.get("failed"), "the tower did not compile"
        eager = qvf.fast_video_features(model.model.visual, pv, g, compile=False)
        scale = ref.abs().max().item()
        assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, scale)
        assert (eager - ref).abs().max().item() <= 1e-4 * max(1.0, scale)
    # bf16: the compiled tower's error against float64 within 1.5x (+0.01) of transformers' own
    pv, g = _inputs(MIXED, seed=3)
    ref64 = _reference(model.double(), pv.double().to(CUDA), g.to(CUDA))
    model.to(torch.bfloat16)
    out = qvf.fast_video_features(model.model.visual, pv.to(CUDA, torch.bfloat16), g.to(CUDA))
    hf = _reference(model, pv.to(CUDA, torch.bfloat16), g.to(CUDA))
    err_fast = (out.double() - ref64).abs().max().item()
    err_hf = (hf.double() - ref64).abs().max().item()
    assert err_fast <= 1.5 * err_hf + 0.01, (err_fast, err_hf)


def test_compiled_qwen3_vl_tower_matches_transformers_on_cuda():
    """qwen3_vision_fast compiled on CUDA (its default) against transformers' Qwen3-VL tower: float32
    (TF32 off) within 1e-4 of scale, main features and deepstack levels; bf16 within 1.5x (+0.01)
    of transformers' own bf16 error against float64."""
    import test_fast_vision_qwen3 as t3

    from adapttoken.models import qwen3_vision_fast as q3f
    from adapttoken.models import qwen_vision_fast as qvf
    model = t3.tiny_tower_model().to(CUDA)
    for grid in t3.GRIDS.values():
        g = torch.tensor(grid, device=CUDA)
        pv = t3._pixels(grid, torch.float32).to(CUDA)
        ref, ref_deep = t3._reference(model, pv, g)
        out, deep = q3f.fast_video_features(model.model.visual, pv, g)       # CUDA default: compiled
        assert "q3_attn_in" in qvf._COMPILED and not qvf._COMPILED.get("q3_failed"), "did not compile"
        for a, b in zip([out] + deep, [ref] + ref_deep):
            assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    grid = t3.GRIDS["mixed"]
    g = torch.tensor(grid, device=CUDA)
    pv = t3._pixels(grid, torch.float32)
    ref64, _ = t3._reference(model.double(), pv.double().to(CUDA), g)
    model.to(torch.bfloat16)
    out, _ = q3f.fast_video_features(model.model.visual, pv.to(CUDA, torch.bfloat16), g)
    hf, _ = t3._reference(model, pv.to(CUDA, torch.bfloat16), g)
    err_fast = (out.double() - ref64).abs().max().item()
    err_hf = (hf.double() - ref64).abs().max().item()
    assert err_fast <= 1.5 * err_hf + 0.01, (err_fast, err_hf)


# -- compiled RMSNorm / SiLU-MLP modules (fused_text.py) ---------------------------------------

def test_fused_text_kernels_match_eager_on_cuda():
    from adapttoken.models import fused_text as ft
    from adapttoken.models.fused_text import FusedText
    from adapttoken.training.tiny import build_tiny_model
    model, _ = build_tiny_model(seed=3, layers=3, vision_depth=1)
    model = model.eval().requires_grad_(False).to(CUDA)
    lm = model.model.language_model
    D = model.config.text_config.hidden_size
    n = max(64, 2 ** 21 // D)                      # above the eager cut-off for short inputs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, D, generator=g).to(CUDA)
    pos = torch.arange(n, device=CUDA).expand(3, 1, n)
    f = FusedText(lm).install()                    # enabled=None: fused on CUDA
    try:
        def logits():
            with torch.inference_mode():
                return model(inputs_embeds=x, position_ids=pos, use_cache=False).logits
        f.enabled = False
        ref = logits()
        f.enabled = None
        out = logits()
        assert not ft._STATE.get("failed"), "the fused kernels did not compile"
        assert f.compiled_calls == len(f.norms) + len(f.mlps), "the compiled route was not taken"
        assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
        assert not torch.equal(out, ref) or n * D >= 2 ** 20    # the fused path really ran
    finally:
        f.uninstall()


# -- the bundled model end to end on the GPU: prefix KV, host tier, warm vs cold -----------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from adapttoken.training import synthetic as syn
    path = tmp_path_factory.mktemp("gpu") / "needle_512.mp4"
    s = syn.make_sample(path, 512, seed=3, kind="what", form="mc", attribute="colour")
    q = s.questions[0]
    return str(path), at.Question(q.text, tuple(q.options)), q.answer


def _model():
    return at.load_model(BUNDLED_MODEL, device="cuda")


def _same(a, b):
    assert a.kept_tokens == b.kept_tokens
    assert [g.entropy for g in a.groups] == [g.entropy for g in b.groups]      # bit-identical
    assert a.answer == b.answer and a.option_probs == b.option_probs


def _prefix_store(model):
    (feats,) = model._features.values()
    return feats.prefix_kv


def test_prefix_kv_on_the_gpu_warm_and_cold_give_the_same_result(sample):
    path, q, _ = sample
    cfg = demo_config(512)
    model = _model()
    cold = at.ask(model, path, q, config=cfg, fresh_features=True)
    kv = _prefix_store(model)
    assert kv.stored >= len(cold.groups) and kv.bytes > 0
    first_key = next(iter(kv._store))
    assert kv._store[first_key][0][0].device.type == "cuda"
    warm = at.ask(model, path, q, config=cfg)
    assert kv.hits >= len(cold.groups) and warm.encoded_slices == 0 and warm.decoded_frames == 0
    _same(cold, warm)
    cold2 = at.ask(_model(), path, q, config=cfg, fresh_features=True)
    _same(cold, cold2)


def _host_only(path, fmt):
    """(model, config, features) with every group's prefix keys/values sent to the host tier in
    format `fmt` (the device tier left no room)."""
    cfg = demo_config(512)
    cfg.prefix_host_bytes, cfg.prefix_host_format = 2 ** 30, fmt
    model = _model()
    video = at.open_video(path, num_frames=cfg.num_frames, max_pixels=cfg.max_pixels,
                          min_pixels=cfg.min_pixels, frames_per_slice=model.adapter.frames_per_slice)
    feats = model.features_for(video)
    feats.configure(prefix_host_bytes=cfg.prefix_host_bytes, prefix_host_format=fmt)
    feats.prefix_kv.fraction = 0.0                  # the device tier is full: all to the host
    return model, cfg, feats


def test_host_tier_second_question_equals_a_fresh_pass(sample):
    path, q, _ = sample
    model, cfg, feats = _host_only(path, "exact")
    first = at.ask(model, path, q, config=cfg)
    kv = feats.prefix_kv
    assert kv.host_stored >= len(first.groups) and kv.bytes == 0 and kv.host_used > 0
    second = at.ask(model, path, q, config=cfg)
    assert kv.hits >= len(first.groups)
    _same(first, second)
    fresh = at.ask(_model(), path, q, config=demo_config(512), fresh_features=True)
    _same(first, fresh)


def test_fp8_host_tier_second_question_agrees_with_a_fresh_pass(sample):
    """The default host tier (fp8) on CUDA: staging buffers, the mover thread and the read-ahead
    on a side stream; a second question from it against a fresh exact run: same answer, >= 90%
    of the kept tokens, |delta H/H_max| <= 0.02 per group. A read-ahead nobody takes is counted
    in held_bytes and let go when the question's group passes end."""
    path, q, _ = sample
    model, cfg, feats = _host_only(path, "fp8")
    other = at.Question("Which colour was the object?", q.options)
    first = at.ask(model, path, other, config=cfg)
    kv = feats.prefix_kv
    assert kv.host_stored >= len(first.groups) >= 2 and kv.bytes == 0
    warm = at.ask(model, path, q, config=cfg)
    assert kv.hits >= len(first.groups) and kv.ahead_hits >= len(first.groups) - 1
    assert kv._ahead is None                        # released after the group passes
    fresh = at.ask(_model(), path, q, config=demo_config(512), fresh_features=True)
    assert warm.answer == fresh.answer
    key = lambda k: (k["slice"], k["row"], k["col"])  # noqa: E731
    a, b = {key(k) for k in fresh.kept_tokens}, {key(k) for k in warm.kept_tokens}
    assert len(a & b) / len(a) >= 0.9
    assert max(abs(x.entropy_norm - y.entropy_norm) for x, y in zip(fresh.groups, warm.groups)) <= 0.02
    before = kv.held_bytes().get("cuda:0", 0)
    kv.get(next(iter(kv._store)), "cuda")           # starts copying the next host group back
    assert kv._ahead is not None
    grew = kv.held_bytes().get("cuda:0", 0) - before
    assert grew >= kv._nbytes[kv._ahead[0]] // 2     # fp8 bytes on the way back, counted
    kv.release_ahead()
    assert kv._ahead is None and kv.held_bytes().get("cuda:0", 0) == before


def test_warm_and_cold_feature_cache_on_the_gpu(sample):
    path, q, _ = sample
    cfg = demo_config(512)
    model = _model()
    cold = at.ask(model, path, q, config=cfg, fresh_features=True)
    (feats,) = model._features.values()
    assert str(feats.storage_device).startswith("cuda")
    assert cold.encoded_slices == cold.num_slices
    other = at.Question("Which colour was it?", q.options)
    warm = at.ask(model, path, other, config=cfg)        # new question: features re-used
    assert warm.encoded_slices == 0 and warm.decoded_frames == 0
    again = at.ask(model, path, q, config=cfg)
    _same(cold, again)
    assert all(math.isfinite(g.entropy) for g in cold.groups)


# -- the question suffix's attention (models/suffix_attention.py) --------------------------------

def test_suffix_attention_on_cuda_matches_float64_as_well_as_transformers_sdpa():
    """bf16 at the 7B's head layout: the lower-right GQA kernel's error against a float64
    reference within 1.5x (+1e-3) of transformers' masked sdpa path, which it replaces."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from adapttoken.models import suffix_attention as sa

    class Attn(torch.nn.Module):             # what the attention functions read of the module
        num_key_value_groups, sliding_window, is_causal = 7, None, True

    H, Hkv, hd, n, L = 28, 4, 128, 71, 3000
    g = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(1, H, n, hd, device=CUDA, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, L, hd, device=CUDA, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, L, hd, device=CUDA, generator=g, dtype=torch.bfloat16)
    allowed = (torch.arange(L, device=CUDA)[None, :] <= (torch.arange(n, device=CUDA)[:, None] + L - n))
    kk, vv = k.double().repeat_interleave(7, 1), v.double().repeat_interleave(7, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * hd ** -0.5
    ref = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv).transpose(1, 2)
    before = sa.stats["lower_right_calls"]
    with sa.suffix_pass():
        fast, _ = sa._attention(Attn(), q, k, v, None, scaling=hd ** -0.5)
    assert sa.stats["lower_right_calls"] == before + 1
    hf, _ = sdpa_attention_forward(Attn(), q, k, v, allowed[None, None], scaling=hd ** -0.5)
    err_fast = (fast.double() - ref).abs().max().item()
    err_hf = (hf.double() - ref).abs().max().item()
    assert err_fast <= 1.5 * err_hf + 1e-3, (err_fast, err_hf)


@pytest.mark.skipif(not (BUNDLED_MODEL / "model.safetensors").is_file(), reason="no bundled model")
def test_group_passes_on_cuda_agree_with_and_without_the_suffix_kernel():
    from adapttoken.models import suffix_attention as sa
    model = at.load_model(BUNDLED_MODEL, device="cuda")
    ad = model.adapter
    assert ad.fast_suffix and ad.model.config._attn_implementation == sa.ATTENTION
    q = at.Question("What colour was the object that appeared in the video?",
                    ("yellow", "red", "blue", "green"))
    sample = BUNDLED_MODEL.parent / "sample.mp4"
    runs = {}
    try:
        for fast in (False, True):
            ad.fast_suffix = fast
            before = sa.stats["lower_right_calls"]
            res = at.ask(model, sample, q, config=demo_config(960), fresh_features=True)
            runs[fast] = (res, sa.stats["lower_right_calls"] - before)
    finally:
        ad.fast_suffix = True
    (slow, n_slow), (fast, n_fast) = runs[False], runs[True]
    assert n_slow == 0 and n_fast == len(fast.groups) * ad.num_layers
    assert fast.answer == slow.answer
    hn = [(a.entropy_norm, b.entropy_norm) for a, b in zip(fast.groups, slow.groups)]
    assert max(abs(a - b) for a, b in hn) <= 0.02, hn
    key = lambda t: (t["slice"], t["row"], t["col"])                         # noqa: E731
    a, b = {key(t) for t in fast.kept_tokens}, {key(t) for t in slow.kept_tokens}
    overlap = len(a & b) / max(1, len(b))
    assert overlap >= 0.9, overlap
