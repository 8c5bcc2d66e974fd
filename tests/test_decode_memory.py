"""Host memory of decoding does not grow with the frame size or count: frames are resized to the
model's input size right after each small read (decode.Prescale), so at most a few frames at
the file's size are alive per decoder lane, and chunks, the stash and the vision tower's input hold
frames at the resized size. Also: 10-bit sources decode to correct 8-bit RGB with both backends,
and the `bench rss` clip writer makes real H.264 of the asked size and pixel format."""
from __future__ import annotations

import os
import threading
import weakref
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import adapttoken as at
import adapttoken.decode as D
import adapttoken.features as F
from adapttoken.frame_reader import FrameReader

from videos import write_video

try:
    import decord  # noqa: F401
    BACKENDS = ["pyav", "decord"]
except ImportError:  # pragma: no cover
    BACKENDS = ["pyav"]

W, H = 320, 240


@pytest.fixture
def counting(monkeypatch, tiny_model):
    """Records, per FrameReader.read call, how many frames at the file's size it returned (wanted
    plus extra), the most such frames alive at once across threads, and the frame shapes the
    model's preprocess received."""
    rec = {"per_read": [], "alive": 0, "peak_alive": 0, "pre_shapes": []}
    lock = threading.Lock()
    orig_read = FrameReader.read

    def read(self, indices, **kw):
        on_extra = kw.get("on_extra")
        if on_extra is not None:
            def wrapped(i, f):
                with lock:
                    rec["extra"] = rec.get("extra", 0) + 1
                on_extra(i, f)
            kw["on_extra"] = wrapped
        frames, times = orig_read(self, indices, **kw)
        with lock:
            rec["per_read"].append(frames.shape[0])
            rec["alive"] += frames.shape[0]
            rec["peak_alive"] = max(rec["peak_alive"], rec["alive"])
        return _track(frames, rec, lock), times

    monkeypatch.setattr(FrameReader, "read", read)
    adapter = tiny_model.adapter
    orig_pre = adapter.preprocess

    def pre(frames, resized):
        rec["pre_shapes"].append(tuple(frames.shape))
        return orig_pre(frames, resized)

    monkeypatch.setattr(adapter, "preprocess", pre)
    return rec


def _track(frames, rec, lock):
    """Count `frames` as alive until torch frees them (their Python object dies with the tensor)."""
    n = frames.shape[0]
    weakref.finalize(frames, lambda: _dec(rec, lock, n))
    return frames


def _dec(rec, lock, n):
    with lock:
        rec["alive"] -= n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workers", [0, 1])
def test_full_size_frames_alive_are_bounded_and_features_unchanged(tiny_model, tmp_path, monkeypatch,
                                                                   counting, backend, workers):
    path = write_video(tmp_path / "v.mp4", 96, width=W, height=H, codec="libx264", gop=12, noise=True)
    frame_bytes = W * H * 3
    monkeypatch.setattr(D, "DECODE_BATCH_BYTES", 2 * frame_bytes)      # two frames per read
    video = at.open_video(path, 64, max_pixels=56 * 84, backend=backend)
    feats = F.SliceFeatures(tiny_model.adapter, video, chunk_slices=8, decode_workers=workers)
    assert feats.resized != (H, W)
    feats.ensure(np.arange(feats.num_slices))
    assert counting["per_read"] and max(counting["per_read"]) <= 2
    # what the reads hand back is dropped after each resize: never more than one read's frames
    # per lane (plus one being handed over) at the file's size
    assert counting["peak_alive"] <= 2 * max(1, workers) + 2, counting["peak_alive"]
    assert counting["pre_shapes"] and all(s[1:3] == feats.resized for s in counting["pre_shapes"])
    got = feats._gather_slices(np.arange(feats.num_slices)).clone()
    feats.release()

    # the same features as resizing the whole chunk in preprocess (the path before Prescale)
    ref = F.SliceFeatures(tiny_model.adapter, at.open_video(path, 64, max_pixels=56 * 84, backend=backend),
                          chunk_slices=8, decode_workers=workers)
    ref.decode_resize = False
    counting["pre_shapes"].clear()
    ref.ensure(np.arange(ref.num_slices))
    assert all(s[1:3] == (H, W) for s in counting["pre_shapes"])
    want = ref._gather_slices(np.arange(ref.num_slices))
    ref.release()
    assert torch.equal(got, want)


def test_lite_stash_holds_resized_frames(tiny_model, tmp_path):
    path = write_video(tmp_path / "s.mp4", 256, width=W, height=H, codec="libx264", gop=16)
    video = at.open_video(path, 256, max_pixels=56 * 84)
    feats = tiny_model.features_for(video)
    feats.configure(decode_workers=0)
    seen = []
    orig_put = feats.stash.put
    feats.stash.put = lambda pos, f: (seen.append(tuple(f.shape)), orig_put(pos, f))
    cfg = at.AdaptTokenConfig(num_frames=256, max_pixels=56 * 84, group_size=8, decode_workers=0,
                              stop_threshold=0.0)           # never stops: every group is read
    at.ask(tiny_model, path, "What is shown?", config=cfg, method="lite")
    assert seen, "the stash took nothing: the test does not exercise it"
    assert set(seen) == {(*feats.resized, 3)}


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (200, 120, 40), (30, 60, 90),
           (128, 128, 128), (0, 0, 0)]


def _colour_bars(path, pix_fmt, w=128, h=96, n=4):
    img = np.zeros((h, w, 3), np.uint8)
    for k, col in enumerate(COLOURS):
        img[:, k * w // 8:(k + 1) * w // 8] = col
    c = av.open(os.fspath(path), "w")
    try:
        s = c.add_stream("libx264", rate=25, options={"preset": "ultrafast", "crf": "8"})
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for i in range(n):
            f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
            f.pts, f.time_base = i, Fraction(1, 25)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    finally:
        c.close()
    return img


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pix_fmt", ["yuv420p10le", "yuv420p"])
def test_colours_of_8_and_10_bit_sources(tmp_path, backend, pix_fmt):
    path = tmp_path / f"bars_{pix_fmt}.mp4"
    ref = _colour_bars(path, pix_fmt)
    with av.open(os.fspath(path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == pix_fmt
    with FrameReader(path, backend=backend) as r:
        frames, _ = r.read([0, 3])
        assert r.backend_used == backend
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (2, 96, 128, 3)
    for img in frames.numpy():
        for k, col in enumerate(COLOURS):
            patch = img[8:-8, k * 16 + 4:k * 16 + 12].astype(int)       # away from chroma edges
            assert np.abs(patch - np.array(col)).max() <= 6, (k, col, patch.mean((0, 1)))


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le"])
def test_bench_rss_clip_is_real_h264_of_the_asked_size(tmp_path, pix_fmt):
    from adapttoken.bench.rss import write_clip
    path = write_clip(tmp_path / "c.mp4", width=96, height=160, seconds=0.4, fps=10, pix_fmt=pix_fmt,
                      verbose=False)
    with av.open(path) as c:
        st = c.streams.video[0]
        assert (st.codec_context.name, st.width, st.height, st.codec_context.pix_fmt) == \
            ("h264", 96, 160, pix_fmt)
        frames = [f.to_ndarray(format="gray") for f in c.decode(st)]
    assert len(frames) == 4
    assert np.abs(frames[0].astype(int) - frames[3]).mean() > 1      # the picture moves


def test_bench_rss_runs_ask_in_a_child_and_reads_its_peak(tmp_path):
    from adapttoken.bench.rss import main
    clip = write_video(tmp_path / "c.mp4", 24, width=128, height=96, codec="libx264")
    out = tmp_path / "rows.json"
    assert main(["--clip", clip, "--frames", "8", "--backends", "pyav", "--out", str(out)]) == 0
    import json
    (row,) = json.loads(out.read_text())
    assert row["rc"] == 0 and row["decoded_frames"] == 8 and "--backend pyav" in row["command"]
    assert 50 * 2 ** 20 < row["peak_rss_bytes"] < 8 * 2 ** 30


def _track_chunks(monkeypatch):
    """Records the bytes of decoded-frame tensors of chunks alive at once (FrameDecoder jobs)."""
    rec = {"alive": 0, "peak": 0, "chunks": []}
    lock = threading.Lock()
    orig = D.FrameDecoder.submit

    def submit(self, positions, lane=None):
        job = orig(self, positions, lane)
        nb = job.out.numel()
        with lock:
            rec["alive"] += nb
            rec["peak"] = max(rec["peak"], rec["alive"])
            rec["chunks"].append(len(positions))
        weakref.finalize(job.out, lambda: _sub(rec, lock, nb))
        return job

    monkeypatch.setattr(D.FrameDecoder, "submit", submit)
    return rec


def _sub(rec, lock, nb):
    with lock:
        rec["alive"] -= nb


@pytest.mark.parametrize("workers", [1, 3])
def test_frames_held_at_the_file_size_are_bounded_by_bytes(tiny_model, tmp_path, monkeypatch, workers):
    """Without decode-time resizing (a model on a GPU), chunks hold frames at the file's size: they
    get fewer slices so that all chunks alive at once (lanes in flight, the one encoded, those
    decoded ahead) stay within PENDING_FRAME_BYTES, whatever the lanes and frame count."""
    path = write_video(tmp_path / "g.mp4", 128, width=W, height=H, codec="libx264", gop=16)
    frame_bytes = W * H * 3
    budget = 24 * frame_bytes
    monkeypatch.setattr(F, "PENDING_FRAME_BYTES", budget)
    rec = _track_chunks(monkeypatch)
    video = at.open_video(path, 128, max_pixels=56 * 84)
    feats = F.SliceFeatures(tiny_model.adapter, video, chunk_slices=16, decode_workers=workers)
    feats.decode_resize = False                      # the GPU path, on the CPU
    assert feats._prescale() is None
    cs = feats.encode_chunk_slices()
    held = feats.held_chunks()
    assert held == workers + 1 + feats.lookahead_chunks
    assert cs == max(1, budget // (held * 2 * frame_bytes)) < 16
    feats.lookahead(np.arange(feats.num_slices))     # chunks decoded ahead count too
    feats.ensure(np.arange(feats.num_slices))
    assert rec["chunks"] and max(rec["chunks"]) <= 2 * cs
    assert rec["peak"] <= budget, (rec["peak"], budget)
    got = feats._gather_slices(np.arange(feats.num_slices)).clone()
    feats.release()

    # with decode-time resizing (the CPU path) chunks keep their slices, and features are the same
    video = at.open_video(path, 128, max_pixels=56 * 84)
    ref = F.SliceFeatures(tiny_model.adapter, video, chunk_slices=16, decode_workers=workers)
    assert ref._prescale() is not None and ref.encode_chunk_slices() == 16
    ref.ensure(np.arange(ref.num_slices))
    # other chunk sizes batch the tower's matmuls differently: equal up to float rounding (bitwise
    # on some CPUs, 7e-8 apart on others)
    torch.testing.assert_close(got, ref._gather_slices(np.arange(ref.num_slices)), rtol=1e-5,
                               atol=1e-6)
    ref.release()


def test_decord_frames_are_not_copied_and_stay_valid(tmp_path):
    pytest.importorskip("decord")
    from adapttoken.frame_reader import _DecordSource
    path = write_video(tmp_path / "d.mp4", 24, width=W, height=H, codec="libx264", gop=8, noise=True)
    with FrameReader(path, backend="pyav") as r:
        want, _ = r.read(list(range(0, 24, 3)))
    with FrameReader(path, backend="decord") as r:
        src = r._source
        assert isinstance(src, _DecordSource)
        kept = [img for _, img in src.read(list(range(0, 24, 3)), "auto")]   # all held at once
        assert not any(k.flags.owndata for k in kept)        # decord's buffers, not copies
    for k, w in zip(kept, want):
        assert np.abs(k.astype(int) - w.numpy()).mean() < 3


def test_decord_reads_give_freed_memory_back(tmp_path, monkeypatch):
    pytest.importorskip("decord")
    import adapttoken.frame_reader as FR
    calls = []
    monkeypatch.setattr(FR, "release_freed_memory", lambda: calls.append(1) or True)
    path = write_video(tmp_path / "t.mp4", 24, width=W, height=H, codec="libx264", gop=8)
    with FrameReader(path, backend="decord") as r:
        for a in range(0, 24, 6):
            r.read(list(range(a, a + 6)))
        assert len(calls) == 4
        r.park()
        assert len(calls) == 5
    with FrameReader(path, backend="pyav") as r:
        r.read([0, 1])
    assert len(calls) == 5                          # PyAV's own buffers are pooled: no trim
    assert FR.release_freed_memory.__name__ == "<lambda>"
    monkeypatch.undo()
    import sys
    if sys.platform.startswith("linux"):
        assert FR.release_freed_memory() in (True, False)
