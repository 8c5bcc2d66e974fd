"""adapttoken.memory: the working memory the nodes ask ComfyUI to leave free is at least what a real
group step / answer step allocates (measured here as the peak of live tensor storage that the
step's own ops create, on the CPU), and not wildly more."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import adapttoken as at
from adapttoken.memory import answer_step_bytes, group_step_bytes, llm_pass_bytes

from videos import write_video


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages created by ops run inside the mode and still referenced (an op
    writing into, or viewing, memory from before the mode adds nothing)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}      # storage ptr -> [bytes, tensors referring]
        self.now = self.peak = 0

    def _drop(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                 if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or (ptr in given and ptr not in self.live):
                continue                      # in place or a view of memory from before the mode
            entry = self.live.get(ptr)
            if entry is None:
                self.live[ptr] = [nbytes, 1]
                self.now += nbytes
                self.peak = max(self.peak, self.now)
            else:
                entry[1] += 1
            weakref.finalize(t, self._drop, ptr)
        return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 128, width=224, height=168, fps=8)


Q = at.Question("What is shown?", ("a dog", "a cat", "a car"))


@pytest.mark.parametrize("group_size", [8, 64])
def test_group_step_estimate_covers_the_measured_peak(tiny_model, clip, group_size):
    tiny_model.clear_cache()
    video = at.open_video(clip, num_frames=128, max_pixels=224 * 168)
    ranked = at.RankedGroups(tiny_model, at.split_groups(video, group_size), Q)
    scored = at.score_groups(ranked)
    estimate = group_step_bytes(ranked)
    # PeakTensorBytes is a TorchDispatchMode, under which torch's CausalBias (a tensor subclass,
    # used by the suffix kernel of models/suffix_attention.py) cannot be created: the kernel then
    # takes transformers' masked path by itself, the larger of the two (repeat_kv copies).
    with torch.inference_mode(), PeakTensorBytes() as m:
        sel = at.allocate(scored, budget=64)
    assert m.peak > 0 and ranked.features.encoded_slices == 64
    assert m.peak <= estimate <= 12 * m.peak, (m.peak, estimate)

    estimate = answer_step_bytes(sel, max_new_tokens=8)
    with torch.inference_mode(), PeakTensorBytes() as m:
        at.answer(sel, max_new_tokens=8)
    assert m.peak <= estimate <= 12 * m.peak, (m.peak, estimate)


def test_uniform_answer_estimate_covers_encoding(tiny_model, clip):
    """The baseline's features are encoded by the answer step itself."""
    tiny_model.clear_cache()
    video = at.open_video(clip, num_frames=128, max_pixels=224 * 168)
    sel = at.uniform_frames(tiny_model, video, Q, budget=400)
    estimate = answer_step_bytes(sel, max_new_tokens=4)
    with torch.inference_mode(), PeakTensorBytes() as m:
        at.answer(sel, max_new_tokens=4)
    assert sel.features.encoded_slices > 0
    assert m.peak <= estimate <= 12 * m.peak, (m.peak, estimate)


def test_estimate_grows_with_the_group_and_with_eager_attention(tiny_model):
    a = tiny_model.adapter
    small, big = llm_pass_bytes(a, 1000, query_tokens=20), llm_pass_bytes(a, 4000, query_tokens=20)
    assert 4 * small <= big < 20 * small                 # the causal mask term is quadratic
    impl = a.model.config._attn_implementation
    try:
        a.model.config._attn_implementation = "eager"
        assert llm_pass_bytes(a, 4000) > big
    finally:
        a.model.config._attn_implementation = impl


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "llava_onevision"])
def test_estimates_cover_every_family(clip, family):
    """The other families' configs (InternVL's llm_config, LLaVA-OneVision's SigLIP tower)."""
    from adapttoken.models.loading import _families
    from adapttoken.training.tiny_families import FAMILIES, build_tiny_family
    assert family in FAMILIES
    model = at.Model(_families()[family](*build_tiny_family(family, seed=0, layers=4)), name=family)
    n = 32 if model.adapter.frames_per_slice == 2 else 16
    video = at.open_video(clip, num_frames=n, max_pixels=64 * 64, min_pixels=64 * 64,
                          frames_per_slice=model.adapter.frames_per_slice)
    ranked = at.RankedGroups(model, at.split_groups(video, 4), Q)
    estimate = group_step_bytes(ranked)
    with torch.inference_mode(), PeakTensorBytes() as m:
        sel = at.allocate(at.score_groups(ranked), budget=24)
    assert m.peak <= estimate <= 12 * m.peak, (m.peak, estimate)
    estimate = answer_step_bytes(sel, max_new_tokens=4)
    with torch.inference_mode(), PeakTensorBytes() as m:
        at.answer(sel, max_new_tokens=4)
    assert m.peak <= estimate <= 12 * m.peak, (m.peak, estimate)
