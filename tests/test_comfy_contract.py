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


@pytest.mark.parametrize("size", [(640, 360), (360, 640), (112, 84)])
def test_frames_of_any_aspect_ratio(tiny_model, tmp_path, size):
    """Users bring 16:9, vertical and odd-sized video with the default 308x560 pixel cap."""
    w, h = size
    path = write_video(tmp_path / f"v{w}x{h}.mp4", 8, width=w, height=h, fps=8)
    cfg = at.AdaptTokenConfig(num_frames=8, group_size=2, budget=16, max_pixels=308 * 560)
    res = at.ask(tiny_model, path, at.Question("What is shown?", ("a", "b")), config=cfg,
                 fresh_features=True)
    rh, rw = tiny_model.adapter.resized_size(h, w, None, 308 * 560)
    assert res.tokens_per_slice == (rh // 28) * (rw // 28)
