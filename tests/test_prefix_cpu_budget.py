"""The CPU budget of the group-prefix key/value cache (PrefixKVCache.set_cpu_bytes, config.prefix_cpu_bytes): `ask` on the
command line answers one question per process, so it keeps none (those states grew the peak
memory of 4096 frames by ~0.8 GiB with the bundled model: docs/bench_rss/README.md); with none kept
the group passes run the same calls, so results are bit-identical to the cached default."""
from __future__ import annotations

import pytest
import torch

import adapttoken as at
from adapttoken.defaults import BUNDLED_MODEL
from adapttoken.kv_cache import PrefixKVCache

needs_bundled = pytest.mark.skipif(not (BUNDLED_MODEL / "model.safetensors").is_file(),
                                   reason="bundled model weights missing")
SAMPLE = BUNDLED_MODEL.parent / "sample.mp4"


def _kv(n):
    return [(torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8))]


def test_negative_budget_is_refused():
    from adapttoken.errors import InputError
    from adapttoken.features import SliceFeatures
    with pytest.raises(InputError, match="prefix_cpu_bytes=-1"):
        SliceFeatures.configure(object.__new__(SliceFeatures), prefix_cpu_bytes=-1)


def test_set_cpu_bytes_trims_latest_first():
    c = PrefixKVCache()
    for i in range(3):
        c.put(i, _kv(50), 100)
    c.set_cpu_bytes(250)
    assert list(c._store) == [0, 1] and c.bytes == 200 and c.cpu_bytes == 250
    assert not c.room(100, torch.device("cpu")) and c.room(50, torch.device("cpu"))
    c.set_cpu_bytes(0)
    assert c.bytes == 0 and not c._store and c.held_bytes() == {}


def test_cli_ask_keeps_no_prefix_states(monkeypatch):
    import adapttoken.cli as cli
    import adapttoken.models.loading as loading
    import adapttoken.pipeline as pipeline
    seen = {}

    class Stop(Exception):
        pass

    def fake_ask(model, video, q, config=None, method=None, **kw):
        seen["cfg"] = config
        raise Stop

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(pipeline, "ask", fake_ask)
    args = cli.build_parser().parse_args(["ask", str(SAMPLE), "what?", "--frames", "16"])
    with pytest.raises(Stop):
        cli.cmd_ask(args)
    assert seen["cfg"].prefix_cpu_bytes == 0 and seen["cfg"].prefix_keep is False
    assert pipeline.AdaptTokenConfig().prefix_cpu_bytes is None     # the library keeps its default


@needs_bundled
def test_no_prefix_states_same_results():
    from adapttoken.demo import demo_config
    q = at.Question("What coloured object appeared in the video?",
                    ("blue square", "green square", "yellow cross", "blue cross"))
    facts, kvs = [], []
    for cpu_bytes in (None, 0):
        model = at.load_model(BUNDLED_MODEL, device="cpu")
        cfg = demo_config(960)
        cfg.prefix_cpu_bytes = cpu_bytes
        res = at.ask(model, SAMPLE, q, config=cfg)
        (feats,) = model._features.values()
        kvs.append((feats.prefix_kv.stored, feats.prefix_kv.refused, feats.prefix_kv.held_bytes()))
        facts.append({"answer": res.answer, "option_probs": res.option_probs,
                      "entropies": [g.entropy for g in res.groups], "kept": res.kept_tokens})
        n = len(res.groups)
    assert facts[0] == facts[1]
    assert kvs[0][0] == n and kvs[0][2].get("cpu", 0) > 0
    assert kvs[1][:2] == (0, n) and kvs[1][2] == {}


@needs_bundled
def test_prefix_keep_false_keeps_nothing_and_changes_nothing():
    """`ask` on the command line answers one question per process: nothing is kept, on any device,
    and the results equal the default's (the same calls run)."""
    from adapttoken.demo import demo_config
    q = at.Question("What coloured object appeared in the video?",
                    ("blue square", "green square", "yellow cross", "blue cross"))
    facts, held = [], []
    for keep in (True, False):
        model = at.load_model(BUNDLED_MODEL, device="cpu")
        cfg = demo_config(960)
        cfg.prefix_keep = keep
        res = at.ask(model, SAMPLE, q, config=cfg)
        (feats,) = model._features.values()
        held.append((feats.prefix_kv.stored, feats.prefix_kv.held_bytes()))
        facts.append({"answer": res.answer, "option_probs": res.option_probs,
                      "entropies": [g.entropy for g in res.groups], "kept": res.kept_tokens})
    assert facts[0] == facts[1]
    assert held[0][0] > 0 and held[1] == (0, {})
