"""adapttoken.models.compat: the KV cache reaches the model under the keyword its forward declares
(`cache` from transformers 5.24, `past_key_values` before), without a deprecation warning."""
from __future__ import annotations

import inspect

import torch
import transformers
from packaging.version import Version

from adapttoken.models.compat import cache_kwarg, cache_kwargs, passed_cache


def test_cache_kwarg_follows_the_forward_signature(tiny):
    model, _ = tiny
    params = inspect.signature(type(model).forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_kwarg(model) == expected
    assert cache_kwarg(model.model.language_model) in inspect.signature(
        type(model.model.language_model).forward).parameters
    if Version(transformers.__version__) >= Version("5.24"):
        assert cache_kwarg(model) == "cache"


def test_the_cache_is_filled_not_dropped(tiny):
    # an unknown keyword would vanish into the forward's **kwargs: the cache must hold the keys
    from transformers import DynamicCache
    model, _ = tiny
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        full = model(input_ids=torch.cat([ids, ids[:, :2]], 1), use_cache=False).logits[0, -1]
        step = model(input_ids=ids[:, :2], use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]
    assert out.logits.shape[1] == 5
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_passed_cache_reads_either_name():
    c = object()
    assert passed_cache({"cache": c}) is c
    assert passed_cache({"past_key_values": c}) is c
    assert passed_cache({"cache": None, "past_key_values": c}) is c
    assert passed_cache({"inputs_embeds": 1}) is None
