"""NVDEC decoding on CUDA (`python tests/gpu/run.py`; skipped without CUDA, and where the driver has
no NVDEC for H.264): the decoder lanes' planes decoded on the GPU (adapttoken/nvdec.py) are those
of PyAV's CPU decoder bit for bit, through sequential reads, seeks and reads backwards, on the
decoder lanes too, and the bundled model gives the same answer, kept tokens and entropies with
NVDEC on and off."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on a GPU machine: python tests/gpu/run.py)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: shared builders

import adapttoken as at                                              # noqa: E402
from adapttoken.decode import FrameDecoder                           # noqa: E402
from adapttoken.defaults import BUNDLED_MODEL                        # noqa: E402
from adapttoken.frame_reader import FrameReader                      # noqa: E402
from adapttoken.nvdec import nvdec_available                         # noqa: E402
from adapttoken.video import probe_video                             # noqa: E402
from adapttoken.yuv import probe_yuv420                              # noqa: E402
from videos import write_video                                       # noqa: E402

CUDA = torch.device("cuda", torch.cuda.current_device())


def _h264(tmp_path, width, height, n=40, gop=8, pix_fmt="yuv420p"):
    path = write_video(tmp_path / f"v{width}x{height}.mp4", n, width=width, height=height,
                       codec="libx264", pix_fmt=pix_fmt, gop=gop, noise=True)
    info = probe_video(path)
    if not nvdec_available(path, info.frame_index.stream_index, CUDA):
        pytest.skip("this GPU's driver offers no NVDEC decoding of H.264 to PyAV here")
    return path, info


@pytest.mark.parametrize("width,height,pix_fmt", [(560, 308, "yuv420p"), (1920, 1080, "yuv420p"),
                                                  (3840, 2160, "yuv420p"), (1280, 720, "yuvj420p")])
def test_nvdec_planes_are_the_cpu_decoders(tmp_path, width, height, pix_fmt):
    path, info = _h264(tmp_path, width, height, pix_fmt=pix_fmt)
    yuv = probe_yuv420(info)
    order = [0, 1, 2, 9, 17, 18, 3, 39, 30, 31]      # on, skip ahead, back, far ahead, back
    with FrameReader(path, backend="pyav", info=info) as sw, \
            FrameReader(path, backend="pyav", info=info, device=CUDA) as hw:
        for strategy in ("auto", "seek", "sequential"):
            want, t_sw = sw.read(order, strategy=strategy, yuv=yuv)
            got, t_hw = hw.read(order, strategy=strategy, yuv=yuv)
            assert got.device == CUDA and want.device.type == "cpu"
            assert torch.equal(got.cpu(), want), (strategy, (got.cpu().int() - want.int()).abs().max())
            assert np.array_equal(t_sw, t_hw)
    print(f"{width}x{height} {pix_fmt}: NVDEC planes equal PyAV's CPU decoding on {len(order)} frames x 3 strategies")


def test_decoder_lanes_on_nvdec_equal_cpu_lanes(tmp_path):
    path, _ = _h264(tmp_path, 1920, 1080, n=96, gop=16)
    res = {}
    for hw in (None, CUDA):
        video = at.open_video(path, 48, max_pixels=None, frames_per_slice=2, backend="pyav")
        dec = FrameDecoder(video, 3, pin=True, yuv=video.yuv420, device=hw)
        try:
            res[hw] = [dec.submit(np.arange(0, 48)).result(), dec.submit(np.arange(20, 30), lane=1).result()]
            torch.cuda.synchronize()
        finally:
            dec.close()
    for a, b in zip(res[CUDA], res[None]):
        assert a.device == CUDA and b.device.type == "cpu"
        assert torch.equal(a.cpu(), b)


def test_bundled_model_same_with_nvdec_and_cpu_decoding(tmp_path):
    from adapttoken.demo import demo_config
    from adapttoken.training import synthetic as syn
    path = tmp_path / "needle_512.mp4"
    s = syn.make_sample(path, 512, seed=5, kind="what", form="mc", attribute="colour")
    info = probe_video(path)
    if not nvdec_available(path, info.frame_index.stream_index, CUDA):
        pytest.skip("no NVDEC for this file here")
    q = at.Question(s.questions[0].text, tuple(s.questions[0].options))
    cfg = demo_config(512)
    cfg.video_backend = "pyav"
    model = at.load_model(BUNDLED_MODEL, device="cuda")
    res = {}
    for hw in (True, False):
        model.clear_cache()
        video = at.open_video(path, cfg.num_frames, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                              frames_per_slice=model.adapter.frames_per_slice, backend="pyav")
        feats = model.features_for(video)
        cfg.hw_decode = hw                  # ask configures the features from the config
        res[hw] = at.ask(model, path, q, config=cfg)
        assert list(model._features.values()) == [feats] and res[hw].decoded_frames > 0
        assert (feats._decoder.device is not None) == hw               # NVDEC takes it here
    a, b = res[True], res[False]
    assert a.answer == b.answer and a.kept_tokens == b.kept_tokens
    assert max(abs(x.entropy - y.entropy) for x, y in zip(a.groups, b.groups)) < 1e-4
