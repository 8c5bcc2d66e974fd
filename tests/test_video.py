"""adapttoken.video on real files written by PyAV (tests/videos.py): every frame carries its number,
so each test checks that the RIGHT frames come back, not just that something does."""
from __future__ import annotations

import logging
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from adapttoken.errors import InputError, VideoError
from adapttoken.frame_reader import FrameReader
from adapttoken.video import SamplingPlan, VideoInfo, plan_sampling, probe_video

try:  # tests/ on sys.path (pytest's default rootdir-less import) or tests as a package
    from videos import frame_number, is_upright, truncate, write_audio_only, write_empty_video, write_video
except ImportError:  # pragma: no cover
    from tests.videos import frame_number, is_upright, truncate, write_audio_only, write_empty_video, write_video

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:  # pragma: no cover
    HAVE_DECORD = False

BACKENDS = ["pyav"] + (["decord"] if HAVE_DECORD else [])
needs_decord = pytest.mark.skipif(not HAVE_DECORD, reason="decord is not installed")

# Irregular presentation times in milliseconds (a variable-frame-rate phone/screen recording).
VFR_PTS_MS = [0, 40, 100, 110, 300, 333, 500, 501, 700, 1000, 1040, 1500, 1520, 1540, 2000, 2033]


def numbers(frames: torch.Tensor) -> list[int]:
    return [frame_number(f.numpy()) for f in frames]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every test video, written once per module (all tiny: the whole set takes well under a second)."""
    d = tmp_path_factory.mktemp("videos")
    f = {
        # H.264 with B-frames (frames reordered), keyframe every 10 frames, 25 fps, 2 s.
        "cfr": write_video(d / "cfr.mp4", 50, codec="libx264", gop=10),
        # Long GOPs are not needed: 120 frames with a keyframe every 5 make sparse and dense reads differ.
        "gop5": write_video(d / "gop5.mp4", 120, codec="libx264", gop=5),
        "vfr": write_video(d / "vfr.mp4", len(VFR_PTS_MS), codec="libx264", pts=VFR_PTS_MS,
                           time_base=Fraction(1, 1000)),
        # Odd sizes: libx264 refuses 97x61 in 4:2:0 (even sizes only) but takes it in 4:4:4;
        # MPEG-4 Part 2, FFV1 and MJPEG take it in 4:2:0.
        "odd_h264": write_video(d / "odd_h264.mp4", 12, width=97, height=61, codec="libx264", pix_fmt="yuv444p"),
        "odd_mpeg4": write_video(d / "odd.mp4", 12, width=97, height=61, codec="mpeg4"),
        "odd_ffv1": write_video(d / "odd.mkv", 12, width=97, height=61, codec="ffv1"),
        "odd_mjpeg": write_video(d / "odd.avi", 12, width=97, height=61, codec="mjpeg"),
        "ffv1": write_video(d / "lossless.mkv", 12, codec="ffv1"),
        "text": str(d / "notes.txt"),
        "text_mp4": str(d / "notes.mp4"),
        "audio": write_audio_only(d / "audio.wav"),
        "empty_avi": write_empty_video(d / "empty.avi"),
        "zero_bytes": str(d / "zero.mp4"),
    }
    for rot in (90, 180, 270):
        try:
            f[f"rot{rot}"] = write_video(d / f"rot{rot}.mp4", 10, width=64, height=48, codec="libx264", rotation=rot)
        except NotImplementedError as e:  # older PyAV: no VideoStream.set_display_rotation
            f[f"rot{rot}"] = f"skip: {e}"
    for name in ("text", "text_mp4"):
        with open(f[name], "w") as fh:
            fh.write("these are notes, not a video\n" * 20)
    open(f["zero_bytes"], "wb").close()
    return f


# ---------------------------------------------------------------------------------------------- probe


def test_probe_constant_rate(files: dict[str, str]) -> None:
    info = probe_video(files["cfr"])
    assert (info.num_frames, info.fps, info.width, info.height, info.rotation) == (50, 25.0, 64, 48, 0)
    assert info.duration == pytest.approx(2.0)
    assert info.codec == "h264"
    np.testing.assert_allclose(info.frame_times, np.arange(50) / 25.0, atol=1e-9)
    assert list(info.frame_index.keyframes) == [0, 10, 20, 30, 40]


def test_probe_accepts_pathlike_and_caches(files: dict[str, str]) -> None:
    from pathlib import Path

    a = probe_video(Path(files["cfr"]))
    b = probe_video(files["cfr"])
    assert a == b and a.frame_index is b.frame_index  # second probe came from the cache


# ------------------------------------------------------------------------------------- constant rate


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_then_read_returns_exactly_the_planned_frames(files: dict[str, str], backend: str) -> None:
    info = probe_video(files["cfr"])
    plan = plan_sampling(info, num_frames=10)
    # Centred uniform rule: frame floor((k + 0.5) * 50 / 10).
    assert plan.indices == (2, 7, 12, 17, 22, 27, 32, 37, 42, 47)
    with FrameReader(files["cfr"], backend=backend) as reader:
        assert reader.backend_used == backend
        frames, times = reader.read(plan.indices)
    assert frames.dtype == torch.uint8 and frames.shape == (10, 48, 64, 3) and frames.device.type == "cpu"
    assert numbers(frames) == list(plan.indices)
    assert times.dtype == np.float64
    np.testing.assert_allclose(times, np.array(plan.indices) / 25.0, atol=1e-9)
    np.testing.assert_allclose(plan.timestamps, times, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_any_order_with_repeats(files: dict[str, str], backend: str) -> None:
    wanted = [33, 5, 33, 0, 49, 5, 12]
    with FrameReader(files["cfr"], backend=backend) as reader:
        frames, times = reader.read(wanted)
        assert numbers(frames) == wanted
        np.testing.assert_allclose(times, np.array(wanted) / 25.0, atol=1e-9)
        # A second read on the same reader may go backwards.
        assert numbers(reader.read([1, 48])[0]) == [1, 48]
        empty, empty_t = reader.read([])
        assert empty.shape == (0, 48, 64, 3) and empty_t.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strategies_give_identical_frames(files: dict[str, str], backend: str) -> None:
    rng = np.random.default_rng(0)
    dense = list(range(3, 117, 2))  # every other frame: dense relative to keyframes every 5
    sparse = [int(i) for i in rng.choice(120, 9, replace=False)] + [7, 7]  # unsorted, repeated
    with FrameReader(files["gop5"], backend=backend) as reader:
        for wanted in (dense, sparse):
            results = {s: reader.read(wanted, strategy=s) for s in ("auto", "sequential", "seek")}
            assert numbers(results["auto"][0]) == wanted
            for s in ("sequential", "seek"):
                assert torch.equal(results[s][0], results["auto"][0]), s
                np.testing.assert_array_equal(results[s][1], results["auto"][1])


# ------------------------------------------------------------------------------------- variable rate


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_timestamps_are_the_written_pts(files: dict[str, str], backend: str) -> None:
    written = np.array(VFR_PTS_MS) / 1000.0
    info = probe_video(files["vfr"])
    assert info.num_frames == len(VFR_PTS_MS)
    np.testing.assert_allclose(info.frame_times, written, atol=1e-9)
    assert info.duration == pytest.approx(2.033 + 0.033, abs=0.02)  # last pts + one frame
    plan = plan_sampling(info, num_frames=6, multiple_of=1)
    np.testing.assert_allclose(plan.timestamps, written[list(plan.indices)], atol=1e-9)
    with FrameReader(files["vfr"], backend=backend) as reader:
        frames, times = reader.read(plan.indices)
    assert numbers(frames) == list(plan.indices)
    np.testing.assert_allclose(times, written[list(plan.indices)], atol=1e-9)


def test_variable_frame_rate_sampling_is_uniform_in_time(files: dict[str, str]) -> None:
    info = probe_video(files["vfr"])
    plan = plan_sampling(info, num_frames=4, multiple_of=1)
    seg = info.duration / 4
    for k, i in enumerate(plan.indices):  # each pick is the frame on screen at its segment's centre
        centre = (k + 0.5) * seg
        times = info.frame_times
        assert times[i] <= centre + 1e-9 and (i + 1 == len(times) or times[i + 1] > centre)
    # Frames 0..3 all lie in the first 0.11 s: a frame-index linspace would have taken two of them.
    assert sum(1 for i in plan.indices if i <= 3) <= 1


# ---------------------------------------------------------------------------------- odd sizes, rotation


@pytest.mark.parametrize("name", ["odd_h264", "odd_mpeg4", "odd_ffv1", "odd_mjpeg"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_frame_sizes(files: dict[str, str], name: str, backend: str) -> None:
    info = probe_video(files[name])
    assert (info.width, info.height, info.num_frames) == (97, 61, 12)
    with FrameReader(files[name], backend=backend) as reader:
        frames, _ = reader.read([11, 0, 6])
    assert frames.shape == (3, 61, 97, 3)
    assert numbers(frames) == [11, 0, 6]


@pytest.mark.parametrize("rotation", [90, 180, 270])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_metadata_is_applied(files: dict[str, str], rotation: int, backend: str) -> None:
    if files[f"rot{rotation}"].startswith("skip: "):
        pytest.skip(files[f"rot{rotation}"][6:])
    info = probe_video(files[f"rot{rotation}"])
    assert info.rotation == rotation
    # Display size: the upright picture is 64x48 whatever the stored orientation.
    assert (info.width, info.height) == (64, 48)
    with FrameReader(files[f"rot{rotation}"], backend=backend) as reader:
        frames, _ = reader.read([0, 9, 4])
    assert frames.shape == (3, 48, 64, 3)
    assert all(is_upright(f.numpy()) for f in frames)
    assert numbers(frames) == [0, 9, 4]


# ------------------------------------------------------------------------------------------- backends


@needs_decord
@pytest.mark.parametrize("name", ["ffv1", "cfr", "rot90", "odd_ffv1"])
def test_decord_and_pyav_give_the_same_frames(files: dict[str, str], name: str) -> None:
    if files[name].startswith("skip: "):
        pytest.skip(files[name][6:])
    info = probe_video(files[name])
    wanted = list(range(info.num_frames))[::-1]
    with FrameReader(files[name], "decord") as a, FrameReader(files[name], "pyav") as b:
        fa, ta = a.read(wanted)
        fb, tb = b.read(wanted)
    np.testing.assert_array_equal(ta, tb)
    assert numbers(fa) == numbers(fb) == wanted
    diff = (fa.int() - fb.int()).abs()
    if name != "odd_ffv1":
        # Same decoded pictures, same YUV->RGB conversion: byte-equal (lossless and H.264 alike).
        assert diff.max().item() == 0
    else:
        # 4:2:0 with an odd size: decord's FFmpeg 4 and PyAV's FFmpeg place the last half chroma
        # row/column differently, so pixels next to colour edges differ; everything else is equal.
        assert diff.float().mean().item() < 0.2
        assert (diff > 2).float().mean().item() < 0.01


def test_auto_falls_back_to_pyav_when_decord_is_missing(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)  # "import decord" now raises ImportError
    with FrameReader(files["cfr"]) as reader:
        assert reader.backend_used == "pyav"
        assert numbers(reader.read([3, 40])[0]) == [3, 40]
    with pytest.raises(InputError, match="decord is not installed"):
        FrameReader(files["cfr"], backend="decord")


@needs_decord
def test_auto_falls_back_to_pyav_when_decord_fails(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import decord

    with FrameReader(files["cfr"]) as reader:
        assert reader.backend_used == "decord"

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error reading file...")

    monkeypatch.setattr(decord, "VideoReader", broken)
    with FrameReader(files["cfr"]) as reader:
        assert reader.backend_used == "pyav"
        assert numbers(reader.read([49, 1])[0]) == [49, 1]
    with pytest.raises(VideoError, match="decord cannot open .*cfr.mp4.*backend='pyav'"):
        FrameReader(files["cfr"], backend="decord")


# --------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path) -> None:
    path = str(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="not found: .*nope.mp4"):
        probe_video(path)
    with pytest.raises(VideoError, match="nope.mp4"):
        FrameReader(path)


def test_folder_is_not_a_video(tmp_path) -> None:
    with pytest.raises(VideoError, match="folder"):
        probe_video(tmp_path)


@pytest.mark.parametrize("name", ["text", "text_mp4"])
def test_text_file_is_not_a_video(files: dict[str, str], name: str) -> None:
    with pytest.raises(VideoError) as e:
        probe_video(files[name])
    assert os.path.basename(files[name]) in str(e.value) and "\n" not in str(e.value)


def test_audio_only_file(files: dict[str, str]) -> None:
    with pytest.raises(VideoError, match=r"audio.wav has no video stream \(streams: audio\)"):
        probe_video(files["audio"])


@pytest.mark.parametrize("name, message", [("zero_bytes", "zero.mp4 is empty"), ("empty_avi", "empty.avi has a video stream but no frames")])
def test_zero_frame_files(files: dict[str, str], name: str, message: str) -> None:
    with pytest.raises(VideoError, match=message):
        probe_video(files[name])
    with pytest.raises(VideoError, match=message):
        FrameReader(files[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_indices(files: dict[str, str], backend: str) -> None:
    with FrameReader(files["cfr"], backend=backend) as reader:
        for bad in ([50], [-1], [1.5]):
            with pytest.raises(InputError, match="indices"):
                reader.read(bad)
        with pytest.raises(InputError, match="strategy"):
            reader.read([1], strategy="fast")
    with pytest.raises(InputError, match="closed"):
        reader.read([1])
    with pytest.raises(InputError, match="backend"):
        FrameReader(files["cfr"], backend="opencv")


# ------------------------------------------------------------------------------------------ truncated


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_truncated_mp4_with_index_first_reads_what_exists(tmp_path, caplog: pytest.LogCaptureFixture, backend: str) -> None:
    # "faststart" puts the frame index before the data: a cut file still lists all 100 frames.
    path = write_video(tmp_path / "cut.mp4", 100, width=160, height=120, codec="libx264", gop=10,
                       container_options={"movflags": "faststart"})
    truncate(path, 0.5)
    with caplog.at_level(logging.WARNING, logger="adapttoken.video"):
        info = probe_video(path)
    assert 0 < info.num_frames < 100
    assert "truncated" in caplog.text and "cut.mp4" in caplog.text
    with FrameReader(path, backend=backend) as reader:
        assert reader.backend_used == "pyav"  # decord counts the frames the index promises: not used
        frames, _ = reader.read(range(info.num_frames))
        assert numbers(frames) == list(range(info.num_frames))
        with pytest.raises(InputError, match=f"out of range for .*cut.mp4, which has {info.num_frames}"):
            reader.read([info.num_frames])


@pytest.mark.parametrize("codec, ext", [("libx264", "mkv"), ("mpeg4", "avi")])
def test_truncated_stream_formats_keep_whole_frames(tmp_path, codec: str, ext: str) -> None:
    path = write_video(tmp_path / f"cut.{ext}", 60, width=160, height=120, codec=codec, gop=10, noise=True)
    truncate(path, 0.5)
    info = probe_video(path)
    assert 0 < info.num_frames < 60
    for backend in ("auto", "pyav"):
        with FrameReader(path, backend=backend) as reader:
            frames, _ = reader.read(range(info.num_frames))
        assert numbers(frames) == list(range(info.num_frames))


def test_truncated_mp4_without_index_is_an_error(tmp_path) -> None:
    path = write_video(tmp_path / "cut_plain.mp4", 60, codec="libx264")  # index written at the end
    truncate(path, 0.6)
    with pytest.raises(VideoError, match="cut_plain.mp4 .*cut short: re-download it"):
        probe_video(path)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_file_cut_while_open_names_file_and_frame(tmp_path, backend: str) -> None:
    path = write_video(tmp_path / "growing.mkv", 80, width=160, height=120, codec="libx264", gop=10, noise=True)
    with FrameReader(path, backend=backend) as reader:
        assert numbers(reader.read([0])[0]) == [0]
        truncate(path, 0.3)
        with pytest.raises(VideoError, match=r"frame 79 of .*growing.mkv.*truncated.*re-download"):
            reader.read([79])


def test_pyav_checks_every_frame_even_if_the_change_goes_unnoticed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the file system hid the change (stale attributes): PyAV matches each decoded frame's pts
    # against the frame table, so it still refuses instead of returning another frame.
    import adapttoken.frame_reader as frame_reader

    path = write_video(tmp_path / "stale.mkv", 80, width=160, height=120, codec="libx264", gop=10, noise=True)
    with FrameReader(path, backend="pyav") as reader:
        truncate(path, 0.3)
        monkeypatch.setattr(frame_reader, "_changed", lambda info: False)
        with pytest.raises(VideoError, match=r"frame 79 of .*stale.mkv could not be decoded .*re-download it"):
            reader.read([79])


# ----------------------------------------------------------------------------------------------- plan


def test_plan_pads_to_multiple_by_repeating_last(files: dict[str, str]) -> None:
    info = probe_video(files["cfr"])
    plan = plan_sampling(info, num_frames=7, multiple_of=2)
    assert len(plan.indices) == 8 and plan.indices[-1] == plan.indices[-2]
    assert plan.timestamps[-1] == plan.timestamps[-2]
    assert list(plan.indices) == sorted(plan.indices)
    assert len(plan_sampling(info, num_frames=5, multiple_of=4).indices) == 8
    assert len(plan_sampling(info, num_frames=7, multiple_of=1).indices) == 7


def test_plan_caps(files: dict[str, str]) -> None:
    info = probe_video(files["cfr"])  # 50 frames, 2 s
    assert len(plan_sampling(info, num_frames=1024, max_fps=2.0, multiple_of=1).indices) == 4
    assert len(plan_sampling(info, num_frames=1024, max_fps=0.1, multiple_of=1).indices) == 1
    everything = plan_sampling(info, num_frames=1024)
    assert everything.indices == tuple(range(50))  # capped by the frames available
    assert everything.sampled_fps == pytest.approx(25.0)


def test_plan_start_end(files: dict[str, str]) -> None:
    info = probe_video(files["cfr"])
    plan = plan_sampling(info, num_frames=4, start=0.4, end=1.2, multiple_of=1)
    assert (plan.start, plan.end) == (0.4, 1.2)
    assert plan.indices == (12, 17, 22, 27)  # frames 10..29 span [0.4, 1.2): centres of 4 segments of 5
    assert all(0.4 <= t < 1.2 for t in plan.timestamps)
    assert plan_sampling(info, num_frames=100, start=1.0, end=99.0).end == pytest.approx(2.0)  # clamped
    assert plan_sampling(info, num_frames=100, start=1.0, multiple_of=1).indices == tuple(range(25, 50))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"start": 1.0, "end": 1.0}, "end"),
        ({"start": 1.5, "end": 0.5}, "end"),
        ({"start": 5.0}, "start=5 s is at or beyond the end of .*cfr.mp4"),
        ({"start": -1.0}, "start"),
        ({"max_fps": 0}, "max_fps"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"max_pixels": 100, "min_pixels": 200}, "min_pixels"),
        ({"start": 0.001, "end": 0.002}, "no frame of .*cfr.mp4 starts in"),
    ],
)
def test_plan_rejects_bad_parameters(files: dict[str, str], kwargs: dict, name: str) -> None:
    info = probe_video(files["cfr"])
    with pytest.raises(InputError, match=name) as e:
        plan_sampling(info, **kwargs)
    assert "\n" not in str(e.value)


def test_plan_key_is_stable_and_sensitive(files: dict[str, str]) -> None:
    info = probe_video(files["cfr"])
    a = plan_sampling(info, num_frames=8, max_pixels=448 * 448)
    assert a.key == plan_sampling(probe_video(files["cfr"]), num_frames=8, max_pixels=448 * 448).key
    assert a.key != plan_sampling(info, num_frames=8, max_pixels=224 * 224).key
    assert a.key != plan_sampling(info, num_frames=10, max_pixels=448 * 448).key
    assert (a.max_pixels, a.min_pixels) == (448 * 448, None)
    assert isinstance(a, SamplingPlan) and len(a.key) == 32


def test_plan_on_hand_made_info_assumes_constant_rate() -> None:
    info = VideoInfo(path="x.mp4", num_frames=100, fps=10.0, duration=10.0, width=64, height=48, rotation=0)
    plan = plan_sampling(info, num_frames=5, multiple_of=1)
    assert plan.indices == (10, 30, 50, 70, 90)
    assert plan.timestamps == (1.0, 3.0, 5.0, 7.0, 9.0)
