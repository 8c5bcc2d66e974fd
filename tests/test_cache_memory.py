"""What the caches hold (SliceFeatures.held_bytes: real tensor bytes per device), dropping them
while the stores stay usable (free_memory), and running out of device memory anywhere: one line
naming what to lower, caches freed (memory.out_of_memory around select() and answer())."""
from __future__ import annotations

import pytest
import torch

import adapttoken as at
from adapttoken.kv_cache import PrefixKVCache, tensor_bytes

from videos import write_video

PX = dict(max_pixels=56 * 56, min_pixels=56 * 56)
CFG = at.AdaptTokenConfig(num_frames=96, group_size=8, budget=24, max_new_tokens=3, **PX)
Q = at.Question("What is shown?", ("a", "b", "c"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("mem") / "clip.mp4", 96, width=64, height=48,
                       fps=8, gop=10)


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10, 4)
    assert tensor_bytes([a, a[:2], a[5:]]) == {"cpu": 160}
    assert tensor_bytes([a, torch.zeros(3, dtype=torch.float16)]) == {"cpu": 166}


def test_held_bytes_and_free_memory(tiny_model, clip):
    first = at.ask(tiny_model, clip, Q, config=CFG, fresh_features=True)
    (feats,) = tiny_model._features.values()
    held = tiny_model.held_bytes()
    blocks = sum(b.numel() * b.element_size() for b in feats._blocks if b is not None)
    kv = feats.prefix_kv
    kv_bytes = sum(t.numel() * t.element_size() for v in kv._store.values() for p in v for t in p)
    assert kv.stored == 6 and kv_bytes == kv.bytes > 0 and blocks > 0
    assert held == {"cpu": blocks + kv_bytes + feats.stash.bytes}
    assert tiny_model.free_memory("cuda:0") == 0 and tiny_model.held_bytes() == held  # none there
    freed = tiny_model.free_memory("cpu")
    assert freed == held["cpu"] and tiny_model.held_bytes() == {}
    assert kv.bytes == 0 and not kv._store and feats.storage_device is None
    again = at.ask(tiny_model, clip, Q, config=CFG)          # the store is still usable
    assert again.encoded_slices == feats.num_slices and kv.hits == 0
    assert again.kept_tokens == first.kept_tokens
    assert [g.entropy for g in again.groups] == [g.entropy for g in first.groups]
    tiny_model.clear_cache()
    assert tiny_model.held_bytes() == {}


def test_prefix_kv_drop_by_tier():
    c = PrefixKVCache(cpu_bytes=0, host_bytes=2 ** 20, host_format="exact")
    kv = [(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))]
    assert c.offer("a", kv, 192, torch.device("cpu")) and c.host_used == 192
    c.cpu_bytes = 2 ** 20
    assert c.offer("b", kv, 192, torch.device("cpu")) and c.bytes == 192
    assert c.held_bytes() == {"cpu": 192}                    # both tiers share the tensors here
    c.drop("cpu")
    assert c.bytes == c.host_used == 0 and c.get("a") is None and c.get("b") is None


class _OOMAt:
    """A forward hook on a real decoder layer that raises the CUDA allocator's error on its n-th
    call (what torch raises when a pass does not fit)."""

    def __init__(self, layer, n):
        self.n, self.calls = n, 0
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.calls += 1
        if self.calls == self.n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; "
                                         "79.10 GiB total capacity; 71.30 GiB already allocated)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("method,call", [("adapttoken", 5), ("lite", 2), ("uniform", 1)])
def test_out_of_memory_in_the_selection(tiny_model, clip, method, call):
    at.ask(tiny_model, clip, Q, config=CFG, fresh_features=True)   # caches filled
    assert tiny_model.held_bytes()
    layer = tiny_model.adapter.text_model.layers[1]
    # the uniform baseline runs no group pass: the answer's prefill is its first layer call
    with _OOMAt(layer, call), pytest.raises(at.OutOfMemory) as ei:
        at.ask(tiny_model, clip, at.Question("Which one?", ("x", "y")), config=CFG, method=method)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("out of GPU memory")
    for knob in ("frames", "budget", "max_pixels"):
        assert knob in msg, msg
    if method != "uniform":
        assert "(96)" in msg and "(24)" in msg and "group size (8)" in msg
    assert tiny_model.held_bytes() == {}                     # every cache freed
    assert ei.value.__cause__ is None
    res = at.ask(tiny_model, clip, Q, config=CFG)            # and the model runs again
    assert res.answer is not None


def test_out_of_memory_in_the_answer(tiny_model, clip):
    tiny_model.clear_cache()
    video = at.open_video(clip, num_frames=96, **PX)
    sel = at.select(tiny_model, video, Q, CFG, "adapttoken")
    assert tiny_model.held_bytes()
    with _OOMAt(tiny_model.adapter.text_model.layers[0], 1), pytest.raises(at.OutOfMemory) as ei:
        at.answer(sel, max_new_tokens=3)
    assert "budget (24)" in str(ei.value) and "\n" not in str(ei.value)
    assert sel.features.held_bytes() == {}
    assert at.answer(sel, max_new_tokens=3).answer is not None   # recomputes what it needs
    tiny_model.clear_cache()
