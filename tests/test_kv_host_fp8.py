"""The prefix KV cache's host tier in FP8 (kv_cache.fp8_pack, PrefixKVCache(host_format="fp8"),
the library's default for that tier): the rounding of one state, that a warm pass from the FP8 tier
is exactly a pass over fp8-rounded keys/values, its bytes, the "auto" size, and agreement with a
fresh pass on the bundled model end to end."""
from __future__ import annotations

import pytest
import torch

import adapttoken as at
from adapttoken.defaults import BUNDLED_MODEL
from adapttoken.kv_cache import (AUTO_HOST_BYTES, PrefixKVCache, auto_host_bytes, fp8_pack,
                                 fp8_unpack, physical_memory_bytes)

from test_prefix_kv_determinism import QUESTIONS, SAMPLE, _group, _random_adapter

needs_bundled = pytest.mark.skipif(not (BUNDLED_MODEL / "model.safetensors").is_file(),
                                   reason="bundled model weights missing")


def test_fp8_pack_rounds_each_value_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 128, generator=g) * torch.logspace(-3, 3, 64)[None, None, :, None]
    x[0, 0, 0] = 0.0                                        # an all-zero row stays zero
    q, s = fp8_pack(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (2, 4, 64, 1)
    y = fp8_unpack(q, s, torch.float32)
    ref = x.to(torch.bfloat16).double()
    # e4m3: 3 mantissa bits (relative step 2^-3, rounding 2^-4); subnormals below 2^-6 of the
    # largest value 448, step 2^-9, in units of the row's scale
    bound = 2.0 ** -4 * ref.abs() + 2.0 ** -10 * s.double()
    assert ((y.double() - ref).abs() <= bound * 1.0001 + 1e-30).all()
    assert torch.equal(y[0, 0, 0], torch.zeros(128))
    assert (q.float().abs().amax(-1) == 448).sum() >= 2 * 4 * 64 - 1     # each row uses the range
    # rounding error is the size e4m3 promises, not smaller (it really is 8 bits) or larger
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert 0.005 < rel < 0.04


def test_warm_pass_from_the_fp8_host_tier_is_a_pass_over_rounded_states():
    """Reference: the cold pass's own keys/values, rounded through fp8_pack/unpack by hand and
    served from the exact device tier, give bit-identical logits and scores to the FP8 host tier."""
    ad = _random_adapter(128, 4)
    embeds, coords, extent = _group(ad)
    prompt = ad.build_prompt(QUESTIONS[0])
    layer = ad.default_layer

    def run(store):
        return ad.forward(prompt, embeds, coords, extent, probe_layer=layer, prefix_cache=(store, "g0"))

    exact = PrefixKVCache()
    cold = run(exact)
    kv = exact.get("g0")
    rounded = PrefixKVCache()
    rounded.put("g0", [(fp8_unpack(*fp8_pack(k), k.dtype), fp8_unpack(*fp8_pack(v), v.dtype))
                       for k, v in kv], 0)
    ref = run(rounded)
    host = PrefixKVCache(cpu_bytes=0, host_bytes=2 ** 30, host_format="fp8")
    cold_h = run(host)
    assert host.host_stored == 1 and host.hits == 0
    warm_h = run(host)
    assert host.hits == 1
    assert torch.equal(cold_h.logits, cold.logits) and torch.equal(cold_h.scores, cold.scores)
    assert torch.equal(warm_h.logits, ref.logits) and torch.equal(warm_h.scores, ref.scores)
    assert not torch.equal(warm_h.logits, cold.logits)          # the rounding is really there
    # bytes: one per value plus a float32 scale per row of head_dim, about half of float32's quarter
    values = sum(k.numel() + v.numel() for k, v in kv)
    head_dim = kv[0][0].shape[-1]
    assert host.host_used == values + 4 * values // head_dim
    assert sum(t.numel() * t.element_size() for p in host._store["g0"] for t in p) == host.host_used


def test_host_format_switch_drops_only_the_host_tier():
    c = PrefixKVCache(cpu_bytes=0, host_bytes=2 ** 20, host_format="exact")
    kv = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))]
    assert c.offer("a", kv, 192, torch.device("cpu")) and c.host_used == 192
    c.cpu_bytes = 2 ** 20
    assert c.offer("b", kv, 192, torch.device("cpu")) and c.bytes == 192
    c.set_host_format("fp8")
    assert c.host_used == 0 and c.get("a") is None and c.get("b") is not None and c.bytes == 192
    with pytest.raises(ValueError, match="host_format"):
        c.set_host_format("int4")


def test_auto_host_size():
    assert auto_host_bytes(torch.device("cpu")) == 0                 # a CPU model: not used
    ram = physical_memory_bytes()
    assert ram > 2 ** 30
    assert auto_host_bytes(torch.device("cuda")) == min(AUTO_HOST_BYTES, ram // 4)
    c = PrefixKVCache(cpu_bytes=0, host_bytes="auto")
    kv = [(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))]
    assert not c.offer("a", kv, 192, torch.device("cpu")) and c.refused == 1
    assert at.AdaptTokenConfig().prefix_host_bytes == "auto"
    assert at.AdaptTokenConfig().prefix_host_format == "fp8"


def test_bad_host_settings_name_the_input(tmp_path):
    from adapttoken.features import SliceFeatures  # noqa: F401 - the class configure belongs to
    model = at.load_model(BUNDLED_MODEL, device="cpu")
    feats = model.features_for(at.open_video(SAMPLE, 32))
    for bad in (-1, "lots"):
        with pytest.raises(at.InputError, match="prefix_host_bytes"):
            feats.configure(prefix_host_bytes=bad)
    with pytest.raises(at.InputError, match="prefix_host_format.*fp8, exact"):
        feats.configure(prefix_host_format="int4")


@needs_bundled
def test_bundled_model_second_question_from_the_fp8_host_tier_agrees_with_a_fresh_pass():
    """The issue's agreement measure for lossy paths: same answer, >= 90% of the kept tokens,
    |delta H/H_max| <= 0.02 per group, against a fresh (exact) run of the same question."""
    from adapttoken.demo import demo_config
    q1 = at.Question("What coloured object appeared in the video?",
                     ("blue square", "green square", "yellow cross", "blue cross"))
    q2 = at.Question("Which colour was the object?", ("red", "blue", "green", "yellow"))
    cfg = demo_config(960)
    cfg.prefix_host_bytes, cfg.prefix_host_format, cfg.prefix_cpu_bytes = 2 ** 30, "fp8", 0
    model = at.load_model(BUNDLED_MODEL, device="cpu")
    at.ask(model, SAMPLE, q1, config=cfg, fresh_features=True)
    (feats,) = model._features.values()
    kv = feats.prefix_kv
    assert kv.host_stored > 0 and kv.bytes == 0
    warm = at.ask(model, SAMPLE, q2, config=cfg)
    assert kv.hits == kv.host_stored
    fresh = at.ask(at.load_model(BUNDLED_MODEL, device="cpu"), SAMPLE, q2, config=demo_config(960),
                   fresh_features=True)
    assert warm.answer == fresh.answer
    key = lambda k: (k["slice"], k["row"], k["col"])  # noqa: E731
    a, b = {key(k) for k in fresh.kept_tokens}, {key(k) for k in warm.kept_tokens}
    assert len(a & b) / len(a) >= 0.9
    for ga, gb in zip(fresh.groups, warm.groups):
        assert abs(ga.entropy_norm - gb.entropy_norm) <= 0.02
    assert any(ga.entropy != gb.entropy for ga, gb in zip(fresh.groups, warm.groups))   # lossy


@needs_bundled
def test_ranked_groups_let_go_of_an_unused_read_ahead():
    """What `ScoredGroups.evaluate` calls when its group passes end (so `pipeline.select`, Budget
    Allocate and Ask Many all do): a read-ahead of the next host group that no pass took is waited
    for and dropped, so its states stop counting in `held_bytes`; a read-ahead whose copy failed is
    dropped without raising. (Read-aheads start only on CUDA; here one is handed to the cache as a
    real future.)"""
    from concurrent.futures import ThreadPoolExecutor
    q = at.Question("What coloured object appeared in the video?",
                    ("blue square", "green square", "yellow cross", "blue cross"))
    model = at.load_model(BUNDLED_MODEL, device="cpu")
    ranked = at.RankedGroups(model, at.split_groups(at.open_video(SAMPLE, 32), 8), q)
    ranked.run(0)
    kv = ranked.features.prefix_kv
    key = next(iter(kv._store))
    before = kv.held_bytes()

    def copy():
        return [(k.clone(), v.clone()) for k, v in kv._store[key]]

    def failed_copy():
        raise RuntimeError("copy failed")

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(copy)
        kv._ahead = (key, fut)
        assert kv.held_bytes()["cpu"] == 2 * before["cpu"]     # the pending copy counts
        ranked.release_read_ahead()
        assert kv._ahead is None and fut.done() and kv.held_bytes() == before
        fut = pool.submit(failed_copy)
        kv._ahead = (key, fut)
        ranked.release_read_ahead()                             # does not raise
        assert kv._ahead is None and fut.done() and kv.held_bytes() == before
        # the group passes of a question (every group, through ScoredGroups) end with the release
        fut = pool.submit(copy)
        kv._ahead = (key, fut)
        at.score_groups(ranked).evaluate()
        assert kv._ahead is None and fut.done()
