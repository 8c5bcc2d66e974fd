"""The YUV handover (yuv.py): decoder lanes hand over 4:2:0 planes and the model's device turns them
into RGB. The torch conversion matches PyAV's to_ndarray(format="rgb24") on real H.264 files (sizes,
BT.601 / BT.709 / untagged, limited and full range, rotation) and on random planes for every matrix it
accepts; files it cannot take keep the RGB path; the pipeline gives the same features and answers
with the handover on (forced on the CPU) and off, Lite's frame stash included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import adapttoken as at
import adapttoken.features as F
from adapttoken.decode import FrameStash
from adapttoken.frame_reader import FrameReader
from adapttoken.video import probe_video
from adapttoken.yuv import LUMA_WEIGHTS, Yuv420, probe_yuv420, yuv420_to_rgb

from videos import random_yuv420, swscale_rgb, write_size_change, write_video

try:
    import decord  # noqa: F401
    HAVE_DECORD = True
except ImportError:  # pragma: no cover
    HAVE_DECORD = False


def _diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int]:
    d = (got.int() - want.int()).abs()
    return float(d.float().mean()), int(d.max())


# (width, height, pix_fmt, colorspace tag): sizes incl. odd halves (70x38: 35x19 chroma) and 1080p
FILES = [(64, 48, "yuv420p", None), (70, 38, "yuv420p", 6), (126, 94, "yuv420p", 1),
         (320, 240, "yuvj420p", None), (320, 240, "yuvj420p", 1), (200, 120, "yuv420p", 5),
         (1920, 1080, "yuv420p", 1)]


@pytest.mark.parametrize("width,height,pix_fmt,colorspace", FILES)
def test_h264_planes_convert_to_pyav_rgb(tmp_path, width, height, pix_fmt, colorspace):
    frames = 3 if width > 1000 else 8
    path = write_video(tmp_path / "v.mp4", frames, width=width, height=height, codec="libx264",
                       pix_fmt=pix_fmt, colorspace=colorspace, noise=True, gop=4)
    yuv = probe_yuv420(probe_video(path))
    assert yuv is not None and yuv.full_range == (pix_fmt == "yuvj420p")
    assert yuv.colorspace == (2 if colorspace is None else colorspace)
    with FrameReader(path, backend="pyav") as r:
        rgb, _ = r.read(range(frames))
        planes, _ = r.read(range(frames), yuv=yuv)
    assert planes.shape == (frames, height * 3 // 2, width)
    mean, worst = _diff(yuv420_to_rgb(planes, yuv), rgb)
    print(f"{width}x{height} {pix_fmt} tag {colorspace}: mean {mean:.5f} max {worst}")
    assert mean < 0.01 and worst <= 1


@pytest.mark.parametrize("colorspace", sorted(LUMA_WEIGHTS))
@pytest.mark.parametrize("full_range", [False, True])
def test_random_planes_convert_to_swscale_rgb(colorspace, full_range):
    """Every value of every plane (random planes reach the clamps and all chroma pairs)."""
    h, w = 120, 200
    fmt = "yuvj420p" if full_range else "yuv420p"
    planes = random_yuv420(colorspace, h, w)
    want = swscale_rgb(planes, fmt, colorspace, full_range)
    got = yuv420_to_rgb(torch.from_numpy(planes), Yuv420(fmt, h, w, colorspace, full_range))
    mean, worst = _diff(got, torch.from_numpy(want))
    print(f"random planes colorspace {colorspace} full {full_range}: mean {mean:.5f} max {worst}")
    assert mean < 0.05 and worst <= 1


def test_rotated_file_comes_out_upright(tmp_path):
    from videos import is_upright
    path = write_video(tmp_path / "r.mp4", 4, width=96, height=64, codec="libx264", rotation=90)
    info = probe_video(path)
    yuv = probe_yuv420(info)
    assert yuv is not None and yuv.rotation == 90 and (yuv.height, yuv.width) == (96, 64)
    with FrameReader(path, backend="pyav") as r:
        rgb, _ = r.read([0, 3])
        planes, _ = r.read([0, 3], yuv=yuv)
    got = yuv420_to_rgb(planes, yuv)
    assert got.shape == rgb.shape == (2, info.height, info.width, 3) and is_upright(got[0].numpy())
    assert _diff(got, rgb)[1] <= 1


def test_files_it_cannot_take_keep_rgb(tmp_path):
    odd = write_video(tmp_path / "odd.avi", 4, width=65, height=49, codec="mpeg4")
    full_chroma = write_video(tmp_path / "444.mp4", 4, codec="libx264", pix_fmt="yuv444p")
    resized = write_size_change(tmp_path / "sizes.ts")
    for path in (odd, full_chroma, resized):
        assert probe_yuv420(probe_video(path)) is None, path
        assert at.open_video(path, 4, backend="pyav").yuv420 is None


def test_handover_needs_pyav(tmp_path):
    path = write_video(tmp_path / "v.mp4", 8, codec="libx264")
    yuv = probe_yuv420(probe_video(path))
    assert at.open_video(path, 8, backend="pyav").yuv420 == yuv is not None
    if not HAVE_DECORD:
        pytest.skip("decord is not installed")
    assert at.open_video(path, 8, backend="decord").yuv420 is None
    assert at.open_video(path, 8, backend="auto").yuv420 is None        # auto reads with decord
    with FrameReader(path, backend="decord") as r, pytest.raises(at.InputError, match="PyAV"):
        r.read([0], yuv=yuv)


def test_when_the_handover_applies(tiny_model, tmp_path):
    path = write_video(tmp_path / "v.mp4", 16, width=128, height=96, codec="libx264")
    video = at.open_video(path, 16, max_pixels=56 * 84, backend="pyav")
    feats = F.SliceFeatures(tiny_model.adapter, video, decode_workers=0)
    assert feats._yuv() is None and feats._prescale() is not None     # CPU model: as before
    feats.configure(yuv_handover=True)                                  # forced (tests)
    assert feats._yuv() == video.yuv420 is not None and feats._prescale() is None
    feats.configure(yuv_handover=False)
    assert feats._yuv() is None
    frames = torch.zeros(16, 96, 128, 3, dtype=torch.uint8)
    mem = at.decode.VideoHandle(video.plan, frames=frames)
    assert F.SliceFeatures(tiny_model.adapter, mem).configure(yuv_handover=True)._yuv() is None


def test_nvdec_only_for_planes_on_a_cuda_device(tiny_model, tmp_path):
    """NVDEC (nvdec.py, checked on a GPU by tests/gpu/test_gpu_nvdec.py) is off by default and needs
    the planes to go to a CUDA device: with a model on the CPU the lanes decode on the CPU."""
    from adapttoken.errors import InputError
    from adapttoken.nvdec import nvdec_available
    path = write_video(tmp_path / "v.mp4", 16, width=128, height=96, codec="libx264")
    video = at.open_video(path, 16, max_pixels=56 * 84, backend="pyav")
    feats = F.SliceFeatures(tiny_model.adapter, video, decode_workers=2)
    assert feats.hw_decode is False and feats._hw_device() is None
    feats.configure(yuv_handover=True, hw_decode=True)                  # planes, but to the CPU
    assert feats._hw_device() is None and feats._get_decoder().device is None
    assert not nvdec_available(path, 0, torch.device("cpu"))
    with pytest.raises(InputError, match="hw_decode"):
        feats.configure(hw_decode="auto")
    feats.release()


@pytest.fixture
def preprocessed(monkeypatch, tiny_model):
    """The frames the model's preprocess receives, per call."""
    seen = []
    adapter = tiny_model.adapter
    orig = adapter.preprocess
    monkeypatch.setattr(adapter, "preprocess", lambda fr, size: (seen.append(fr.clone()), orig(fr, size))[1])
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_features_same_with_and_without_handover(tiny_model, tmp_path, preprocessed, workers):
    path = write_video(tmp_path / "v.mp4", 48, width=160, height=120, codec="libx264", gop=8, noise=True)
    out = {}
    for handover in (False, True):
        video = at.open_video(path, 32, max_pixels=56 * 84, backend="pyav")
        feats = F.SliceFeatures(tiny_model.adapter, video, chunk_slices=4, decode_workers=workers)
        feats.decode_resize = False                     # RGB at the file's size, as on a GPU
        feats.configure(yuv_handover=handover)
        preprocessed.clear()
        feats.ensure(np.arange(feats.num_slices))
        assert all(f.shape[1:] == (120, 160, 3) for f in preprocessed)
        out[handover] = (torch.cat(preprocessed), feats._gather_slices(np.arange(feats.num_slices)).clone())
        feats.release()
    mean, worst = _diff(out[True][0], out[False][0])
    assert mean < 0.01 and worst <= 1
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("workers", [0, 2])
def test_lite_stash_holds_planes(tiny_model, tmp_path, workers):
    path = write_video(tmp_path / "s.mp4", 256, width=160, height=120, codec="libx264", gop=16)
    cfg = at.AdaptTokenConfig(num_frames=256, max_pixels=56 * 84, group_size=8, decode_workers=workers,
                              stop_threshold=0.0, video_backend="pyav")   # never stops: reads every group
    res = {}
    for handover in (False, True):
        video = at.open_video(path, 256, max_pixels=56 * 84, backend="pyav")
        feats = tiny_model.features_for(video)
        feats.decode_resize = False
        feats.configure(yuv_handover=handover)
        seen, orig_put = [], feats.stash.put
        feats.stash.put = lambda pos, f: (seen.append(tuple(f.shape)), orig_put(pos, f))
        res[handover] = at.ask(tiny_model, path, "What is shown?", config=cfg, method="lite")
        assert seen, "the stash took nothing: the test does not exercise it"
        assert set(seen) == {(180, 160) if handover else (120, 160, 3)}
        assert feats.stash.bytes == 0 and feats.stash_stats()["ride_along_used_frames"] > 0
        tiny_model.clear_cache()
    assert res[True].answer == res[False].answer
    assert res[True].kept_tokens == res[False].kept_tokens


def test_stash_counts_plane_bytes():
    stash = FrameStash(limit_bytes=3 * 180 * 160)
    plane = torch.zeros(180, 160, dtype=torch.uint8)
    assert stash.room(plane.numel()) == 3
    stash.set_wanted([0, 1, 2, 3])
    stash.put([0, 1], plane)
    stash.put([2, 3], plane)            # only one more fits
    assert stash.bytes == 3 * plane.numel() and stash.captured == 3
    assert set(stash.take([0, 1, 2, 3])) == {0, 1, 2} and stash.bytes == 0


def test_bad_planes_are_refused():
    yuv = Yuv420("yuv420p", 48, 64, 1, False)
    with pytest.raises(ValueError, match=r"\[N, 72, 64\]"):
        yuv420_to_rgb(torch.zeros(2, 48, 64, 3, dtype=torch.uint8), yuv)


def test_nvdec_surfaces_are_counted_for_a_cuda_device_only(tiny_model, tmp_path):
    """memory.nvdec_bytes: the decoder surfaces live outside torch's allocator (torch's peak never
    shows them), so the step estimates ComfyUI is handed add them while frames remain to decode."""
    from adapttoken import memory
    path = write_video(tmp_path / "v.mp4", 16, width=128, height=96, codec="libx264")
    video = at.open_video(path, 16, max_pixels=56 * 84, backend="pyav")
    feats = F.SliceFeatures(tiny_model.adapter, video, decode_workers=3)
    cuda = torch.device("cuda", 0)
    assert memory.nvdec_bytes(feats, cuda) == 0                          # off by default
    feats.configure(hw_decode=True)             # handover left to the device: the model is on the
    per_lane = memory.NVDEC_SURFACES_PER_LANE * 96 * 128 * 3 // 2  # CPU now, counted for the GPU
    assert feats._yuv() is None and memory.nvdec_bytes(feats, cuda) == 3 * per_lane
    feats.configure(yuv_handover=True)
    assert memory.nvdec_bytes(feats, torch.device("cpu")) == 0
    assert memory.nvdec_bytes(feats, cuda) == 3 * per_lane
    feats.configure(yuv_handover=False)                                   # RGB lanes: CPU decoding
    assert memory.nvdec_bytes(feats, cuda) == 0
    feats.release()


def test_nvdec_surface_count_matches_the_measured_run():
    """The constant against the run it was measured in: 8 lanes of 4K H.264 on an H200, memory
    outside torch with NVDEC minus the same with CPU lanes (same process, same file)."""
    import json
    from pathlib import Path
    from adapttoken import memory
    res = json.loads((Path(__file__).resolve().parents[1] / "docs" / "bench_gpu_sources"
                      / "nvdec_4k_4096" / "results.json").read_text())
    cpu = res["cases"][0]["features"]
    hw = res["variants"][0]["features"]
    assert hw["hw_decode"] and not cpu["hw_decode"]
    measured = (hw["outside_torch_gib"] - cpu["outside_torch_gib"]) * 2 ** 30
    v = res["meta"]["video"]
    estimate = res["meta"]["decode_workers"] * memory.NVDEC_SURFACES_PER_LANE * v["height"] * v["width"] * 3 // 2
    assert measured <= estimate <= 1.05 * measured
