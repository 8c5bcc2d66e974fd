"""The library as ComfyUI drives it, without ComfyUI: every prompt runs under
torch.inference_mode() in a worker thread, while /free ("Unload models") drops the feature cache
from outside inference mode. Both must work."""
from __future__ import annotations

import threading

import pytest
import torch

import adapttoken as at

from videos import write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 48, width=64, height=48, fps=8)


def _config():
    return at.AdaptTokenConfig(num_frames=32, group_size=4, budget=16, max_pixels=56 * 56,
                               min_pixels=56 * 56)


def test_inference_mode_run_then_release_outside(tiny_model, clip):
    q = at.Question("What is shown?", ("a dog", "a cat"))
    out = {}

    def prompt_worker():
        with torch.inference_mode():
            out["res"] = at.ask(tiny_model, clip, q, config=_config(), fresh_features=True)

    t = threading.Thread(target=prompt_worker)
    t.start()
    t.join()
    assert out["res"].encoded_slices == 16
    tiny_model.clear_cache()                  # /free runs outside inference mode
    with torch.inference_mode():
        again = at.ask(tiny_model, clip, q, config=_config())
    assert again.encoded_slices == 16 and again.answer == out["res"].answer
