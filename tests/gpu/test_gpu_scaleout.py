"""Scale-out on one GPU: accelerate's device_map with layers offloaded to the host (their weights
are loaded onto the GPU layer by layer and are 'meta' in between), so the attention probe and the
pruned forward must follow each layer's device and hooks. Tensor parallel needs two GPUs (its
CPU tests run two gloo ranks: tests/test_distributed.py)."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("accelerate")

import adapttoken as at                                              # noqa: E402
from adapttoken.demo import demo_config                              # noqa: E402
from adapttoken.defaults import BUNDLED_MODEL                        # noqa: E402


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from adapttoken.training import synthetic as syn
    path = tmp_path_factory.mktemp("gpu") / "needle_256.mp4"
    s = syn.make_sample(path, 256, seed=5, kind="what", form="mc", attribute="colour")
    q = s.questions[0]
    return str(path), at.Question(q.text, tuple(q.options))


def _close(a, b, tol=2e-2):
    """Same answer and groups, entropies within bf16 noise, nearly the same kept tokens."""
    a, b = json.loads(a.to_json()), json.loads(b.to_json())
    assert a["answer"] == b["answer"]
    assert [g["group"] for g in a["groups"]] == [g["group"] for g in b["groups"]]
    for x, y in zip(a["groups"], b["groups"]):
        assert (x["entropy"] is None) == (y["entropy"] is None)
        if x["entropy"] is not None:
            assert abs(x["entropy"] - y["entropy"]) <= tol
    key = lambda t: (t["slice"], t["row"], t["col"])  # noqa: E731
    ka, kb = set(map(key, a["kept_tokens"])), set(map(key, b["kept_tokens"]))
    assert ka and len(ka & kb) >= 0.9 * len(ka)


@pytest.mark.parametrize("method", ["adapttoken", "lite"])
def test_device_map_with_offloaded_layers_answers_as_on_one_device(sample, method):
    path, q = sample
    cfg = demo_config(256)
    one = at.ask(at.load_model(BUNDLED_MODEL, device="cuda"), path, q, config=cfg, method=method)
    lm = "model.language_model"
    dm = {"model.visual": 0, f"{lm}.embed_tokens": 0, f"{lm}.rotary_emb": 0,
          f"{lm}.layers.0": 0, f"{lm}.layers.1": 0, f"{lm}.layers.2": "cpu",
          f"{lm}.layers.3": "cpu", f"{lm}.norm": "cpu", "lm_head": "cpu"}
    model = at.load_model(BUNDLED_MODEL, device="cuda", device_map=dm)
    ad = model.adapter
    # the probe's layer (3 of 4) is one of the offloaded ones: its weights are not on a device
    assert ad.default_layer == 3
    assert ad.text_model.layers[3].self_attn.q_proj.weight.device.type == "meta"
    assert ad.device == torch.device("cuda", 0)
    _close(one, at.ask(model, path, q, config=cfg, method=method))


def test_device_map_auto_equals_the_plain_load(sample):
    """Over every GPU the machine has (on a 2-GPU machine the probe's layer lands on the second:
    the probe's indices follow the layer's device)."""
    path, q = sample
    cfg = demo_config(256)
    one = at.ask(at.load_model(BUNDLED_MODEL, device="cuda"), path, q, config=cfg)
    got = at.ask(at.load_model(BUNDLED_MODEL, device_map="auto"), path, q, config=cfg)
    _close(one, got)
