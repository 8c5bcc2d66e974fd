"""The YUV handover on CUDA (`python tests/gpu/run.py`; skipped without CUDA): the 4:2:0 planes turned
into RGB on the GPU match PyAV's to_ndarray(format="rgb24") on this machine's PyAV (real H.264 up to
4K, every colour matrix on random planes), and the bundled model gives the same answer and kept tokens
with the handover on (the default on CUDA with PyAV) and off."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on a GPU machine: python tests/gpu/run.py)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: shared builders

import adapttoken as at                                              # noqa: E402
from adapttoken.defaults import BUNDLED_MODEL                        # noqa: E402
from adapttoken.frame_reader import FrameReader                      # noqa: E402
from adapttoken.video import probe_video                             # noqa: E402
from adapttoken.yuv import LUMA_WEIGHTS, Yuv420, probe_yuv420, yuv420_to_rgb  # noqa: E402
from videos import random_yuv420, swscale_rgb, write_video           # noqa: E402

CUDA = torch.device("cuda")


def _diff(got, want):
    d = (got.cpu().int() - want.int()).abs()
    return float(d.float().mean()), int(d.max())


@pytest.mark.parametrize("width,height,pix_fmt,colorspace", [
    (560, 308, "yuv420p", None), (1920, 1080, "yuv420p", 1), (3840, 2160, "yuv420p", 1),
    (1280, 720, "yuvj420p", None), (640, 480, "yuv420p", 6)])
def test_h264_planes_on_cuda_match_pyav(tmp_path, width, height, pix_fmt, colorspace):
    path = write_video(tmp_path / "v.mp4", 3, width=width, height=height, codec="libx264",
                       pix_fmt=pix_fmt, colorspace=colorspace, noise=True)
    yuv = probe_yuv420(probe_video(path))
    assert yuv is not None
    with FrameReader(path, backend="pyav") as r:
        rgb, _ = r.read(range(3))
        planes, _ = r.read(range(3), yuv=yuv)
    got = yuv420_to_rgb(planes.to(CUDA), yuv)
    assert got.device.type == "cuda"
    mean, worst = _diff(got, rgb)
    cpu_mean, cpu_worst = _diff(got, yuv420_to_rgb(planes, yuv))
    print(f"{width}x{height} {pix_fmt} tag {colorspace}: vs PyAV mean {mean:.5f} max {worst}; "
          f"vs the CPU conversion mean {cpu_mean:.6f} max {cpu_worst}")
    assert mean < 0.05 and worst <= 1 and cpu_worst <= 1


@pytest.mark.parametrize("colorspace", sorted(LUMA_WEIGHTS))
@pytest.mark.parametrize("full_range", [False, True])
def test_random_planes_on_cuda_match_swscale(colorspace, full_range):
    h, w = 240, 320
    fmt = "yuvj420p" if full_range else "yuv420p"
    planes = random_yuv420(colorspace, h, w)
    want = swscale_rgb(planes, fmt, colorspace, full_range)
    got = yuv420_to_rgb(torch.from_numpy(planes).to(CUDA), Yuv420(fmt, h, w, colorspace, full_range))
    mean, worst = _diff(got, torch.from_numpy(want))
    print(f"random planes colorspace {colorspace} full {full_range}: mean {mean:.5f} max {worst}")
    assert mean < 0.05 and worst <= 1


def test_bundled_model_same_with_and_without_the_handover(tmp_path):
    from adapttoken.demo import demo_config
    from adapttoken.training import synthetic as syn
    path = tmp_path / "needle_512.mp4"
    s = syn.make_sample(path, 512, seed=5, kind="what", form="mc", attribute="colour")
    q = at.Question(s.questions[0].text, tuple(s.questions[0].options))
    cfg = demo_config(512)
    cfg.video_backend = "pyav"
    model = at.load_model(BUNDLED_MODEL, device="cuda")
    res = {}
    for handover in (None, False):
        model.clear_cache()
        video = at.open_video(path, cfg.num_frames, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                              frames_per_slice=model.adapter.frames_per_slice, backend="pyav")
        feats = model.features_for(video)
        if handover is False:
            feats.configure(yuv_handover=False)
        assert (feats._yuv() is not None) == (handover is None)
        res[handover] = at.ask(model, path, q, config=cfg)
        assert list(model._features.values()) == [feats] and res[handover].decoded_frames > 0
    a, b = res[None], res[False]
    assert a.answer == b.answer and a.kept_tokens == b.kept_tokens
    assert max(abs(x.entropy - y.entropy) for x, y in zip(a.groups, b.groups)) < 1e-3
