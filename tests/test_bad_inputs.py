"""Odd and bad inputs through the Python API and the command line: each is answered (a GIF, a still
image, a two-stream file: the first video stream; a still image is a one-frame video) or refused
with one line naming the input and what to do. The ComfyUI side is in tests/comfy/test_nodes_server.py.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import adapttoken as at
from adapttoken.defaults import BUNDLED_MODEL
from adapttoken.errors import InputError, VideoError
from adapttoken.frame_reader import FrameReader
from adapttoken import video as video_module
from adapttoken.video import check_video_path, plan_sampling, probe_video

from videos import (claim_duration, frame_number, write_gif, write_image, write_size_change,
                    write_two_video_streams, write_video)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = "https://example.com/clip.mp4"
HOURS_20 = 20 * 3600


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, str]:
    """Small files, one per odd input (16 frames at 8 fps unless said)."""
    d = tmp_path_factory.mktemp("odd")
    return {
        "size change": write_size_change(d / "size_change.ts"),            # 8 at 64x48, 8 at 128x96
        "two streams": write_two_video_streams(d / "two_streams.mkv"),
        "gif": write_gif(d / "anim.gif", 12, fps=10),
        "png": write_image(d / "still.png", 7),
        "jpeg": write_image(d / "still.jpg", 7),
        "spaces and non-ASCII": write_video(d / "my vidéo 日本 clip.mp4", 16, fps=8),
        "10-bit": write_video(d / "ten_bit.mp4", 16, fps=8, codec="libx264", pix_fmt="yuv420p10le"),
        "header claims 20 h": claim_duration(write_video(d / "liar.mp4", 16, fps=8), HOURS_20),
        "20 h timestamp gap": write_video(d / "gap.mp4", 16, fps=8, pts=[*range(15), HOURS_20 * 8]),
    }


# frames of each file, read with every backend: (frame count, numbers read back)
FRAMES = {
    "size change": (16, list(range(16))),
    "two streams": (16, list(range(16))),
    "gif": (12, list(range(12))),
    "png": (1, [7]),
    "jpeg": (1, [7]),
    "spaces and non-ASCII": (16, list(range(16))),
    "10-bit": (16, list(range(16))),
    "header claims 20 h": (16, list(range(16))),
    "20 h timestamp gap": (16, list(range(16))),
}


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("case", list(FRAMES))
def test_odd_files_decode_to_the_right_frames(odd, case, backend):
    info = probe_video(odd[case])
    n, numbers = FRAMES[case]
    assert info.num_frames == n and (info.width, info.height) == (64, 48)
    with FrameReader(odd[case], backend=backend) as r:
        frames, _ = r.read(range(n))
    assert frames.shape == (n, 48, 64, 3)
    assert [frame_number(f.numpy()) for f in frames] == numbers


def test_size_change_is_resized_to_the_first_size_also_after_a_seek(odd):
    """Frames after the change come at the plan's size (the first frame's), read in any order; decord,
    which repeats or garbles such frames, steps aside with a message naming the file."""
    assert probe_video(odd["size change"]).frame_index.params_change
    assert not probe_video(odd["two streams"]).frame_index.params_change
    assert not probe_video(odd["10-bit"]).frame_index.params_change
    for strategy in ("seek", "auto"):
        with FrameReader(odd["size change"], backend="pyav") as r:
            frames, _ = r.read([12, 3, 9], strategy=strategy)
        assert [frame_number(f.numpy()) for f in frames] == [12, 3, 9]
    with pytest.raises(VideoError, match=r"size_change\.ts may change mid-stream.*backend='pyav'"):
        FrameReader(odd["size change"], backend="decord")
    with FrameReader(odd["size change"]) as r:
        assert r.backend_used == "pyav"


def test_ten_bit_decodes_to_8_bit_rgb(odd):
    with FrameReader(odd["10-bit"]) as r:
        frames, _ = r.read([5])
    grey = frames[0, 30:40, 20:60].float()            # the mid-grey background (128)
    assert frames.dtype.is_floating_point is False and abs(grey.mean().item() - 128) < 6


def test_a_header_claiming_20_hours_is_not_believed(odd, caplog):
    info = probe_video(odd["header claims 20 h"])
    assert abs(info.duration - 2.0) < 1e-6              # from the frames' own timestamps
    caplog.set_level(logging.WARNING, logger="adapttoken.video")
    video_module._cache.clear()                         # the warning comes with a fresh scan
    gap = probe_video(odd["20 h timestamp gap"])
    assert gap.duration > HOURS_20 and "timestamps jump from 1.750 to 72000.000 s" in caplog.text
    plan = plan_sampling(gap, num_frames=8)             # uniform in time: frames that exist, once each
    assert len(plan.indices) <= 8 and max(plan.indices) <= 15
    assert len(set(plan.indices[:-1])) == len(plan.indices[:-1])


def test_a_url_is_not_fetched():
    for call in (check_video_path, probe_video, at.open_video):
        with pytest.raises(VideoError, match=r"https://example\.com/clip\.mp4 is a URL: only local files "
                                             r"are read .*download the video and give the path"):
            call(URL)


# -- the whole method through the API, with the bundled model --------------------------------------

needs_bundled = pytest.mark.skipif(not (BUNDLED_MODEL / "model.safetensors").is_file(),
                                   reason="bundled model weights missing")


@pytest.fixture(scope="module")
def bundled():
    return at.load_model(BUNDLED_MODEL, device="cpu")


def _config(**kw):
    base = dict(num_frames=64, group_size=4, budget=64, max_pixels=56 * 56, min_pixels=56 * 56)
    base.update(kw)
    return at.AdaptTokenConfig(**base)


Q = at.Question("What colour is the square?", ("red", "green", "blue", "grey"))


@needs_bundled
@pytest.mark.parametrize("case", list(FRAMES))
def test_odd_files_are_answered(bundled, odd, case):
    n = FRAMES[case][0]
    res = at.ask(bundled, odd[case], Q, config=_config(), fresh_features=True)
    assert res.answer.strip()[:1] in "ABCD" and sorted(res.option_probs) == ["A", "B", "C", "D"]
    assert res.num_frames == n + n % 2 and res.num_slices == (n + 1) // 2   # a still: one 2-frame slice
    assert res.kept_tokens


@needs_bundled
def test_a_still_image_is_a_one_frame_video(bundled, odd):
    v = at.open_video(odd["png"], frames_per_slice=2)
    assert v.plan.indices == (0, 0) and v.num_slices == 1   # its frame twice: one temporal patch
    assert [frame_number(f.numpy()) for f in v.read(np.arange(2))] == [7, 7]
    res = at.ask(bundled, odd["png"], Q, config=_config(), method="lite")
    assert res.num_slices == 1 and res.group_passes == 1


@needs_bundled
def test_budget_above_the_tokens_keeps_them_all(bundled, odd):
    video = odd["two streams"]
    for method in at.pipeline.METHODS:
        res = at.ask(bundled, video, Q, config=_config(budget=10**9, redundancy_threshold=None),
                     method=method)
        assert len(res.kept_tokens) == res.num_slices * res.tokens_per_slice, method


BAD_API = {
    "empty question": (dict(question=""), InputError, "question is empty: type a question"),
    "blank question": (dict(question=" \n\t"), InputError, "question is empty"),
    "question with a lone surrogate": (dict(question="What \udcff?"), InputError,
                                       r"question is not valid UTF-8 text \(byte 0xff at position 5\): retype it"),
    "question bytes not UTF-8": (dict(question=b"Was \xe4?"), InputError,
                                 r"question is not valid UTF-8 text \(byte 0xe4 at position 4\)"),
    "option not UTF-8": (dict(options=("red", b"gr\xfcn")), InputError,
                         r"option B is not valid UTF-8 text \(byte 0xfc at position 2\)"),
    "27 options": (dict(options=tuple(f"choice {i}" for i in range(27))), InputError,
                   r"options: 27 given, at most 26 \(A-Z\) are supported: remove 1 of them"),
    "budget 0": (dict(budget=0), InputError, "budget=0 must be a positive number of tokens: set it to 1"),
    "budget negative": (dict(budget=-5), InputError, "budget=-5 must be a positive number of tokens"),
    "start after the end": (dict(start=30.0), InputError,
                            r"start=30 s is at or beyond the end of .*clip\.mp4 \(duration 2\.000 s\): "
                            r"use a start below 2\.000"),
    "start negative": (dict(start=-1.0), InputError, r"start must be .* >= 0 \(got -1\.0; .* lasts 2\.000 s\)"),
    "end before the start": (dict(start=1.0, end=0.5), InputError,
                             r"end \(0\.5 s\) must be greater than start \(1 s\) \(.* lasts 2\.000 s\)"),
    "URL": (dict(video=URL), VideoError, "is a URL: only local files are read"),
}


@needs_bundled
@pytest.mark.parametrize("case", list(BAD_API))
def test_bad_api_input_is_one_clear_line(bundled, odd, case):
    kw, error, message = BAD_API[case]
    kw = dict(kw)
    video = kw.pop("video", odd["spaces and non-ASCII"])
    question = kw.pop("question", Q.text)
    options = kw.pop("options", Q.options)
    with pytest.raises(error, match=message) as e:
        at.ask(bundled, video, question, options=options, config=_config(**kw))
    assert "\n" not in str(e.value)


def test_utf8_bytes_are_a_question():
    q = at.Question("Où est le chat ?".encode(), (b"ici", "l\u00e0"))
    assert q.text == "Où est le chat ?" and q.options == ("ici", "là")


@needs_bundled
def test_end_after_the_end_is_clamped_with_a_warning(bundled, odd, caplog):
    caplog.set_level(logging.WARNING, logger="adapttoken.video")
    res = at.ask(bundled, odd["spaces and non-ASCII"], Q, config=_config(end=99.0))
    assert res.num_frames == 16
    assert "end=99 s is beyond the end of" in caplog.text and "(duration 2.000 s)" in caplog.text


# -- the command line ------------------------------------------------------------------------------

def _cli(*args, timeout=300):
    """`python -m adapttoken ...` on this checkout; arguments may be bytes (not UTF-8)."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    return subprocess.run([sys.executable, "-m", "adapttoken", *(a if isinstance(a, bytes) else str(a) for a in args)],
                          capture_output=True, timeout=timeout, env=env, cwd=REPO_ROOT)


SMALL = ("--frames", 64, "--group-size", 4, "--budget", 64, "--max-pixels", 56 * 56)


@needs_bundled
@pytest.mark.parametrize("case", ["gif", "png", "size change", "spaces and non-ASCII"])
def test_cli_answers_odd_files(odd, case):
    extra = ("--budget", 10**6, "--redundancy", -1) if case == "gif" else ()   # above the tokens
    r = _cli("ask", odd[case], "What colour?", "--option", "red", "--option", "blue", *SMALL, *extra,
             "--json")
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    out = json.loads(r.stdout)
    n = FRAMES[case][0]
    assert out["num_frames"] == n + n % 2 and out["answer"]
    if extra:
        assert len(out["kept_tokens"]) == out["num_slices"] * out["tokens_per_slice"]


BAD_CLI = {
    "URL": ((URL, "What?"), "video https://example.com/clip.mp4 is a URL: only local files are read"),
    "question not UTF-8": ((None, b"What \xff?"), "question is not valid UTF-8 text (byte 0xff at position 5)"),
    "option not UTF-8": ((None, "What?", "--option", "a", "--option", b"b\xfe"),
                         "option B is not valid UTF-8 text (byte 0xfe at position 1)"),
    "empty question": ((None, ""), "question is empty: type a question about the video"),
    "27 options": ((None, "What?", *[x for i in range(27) for x in ("--option", f"o{i}")]),
                   "options: 27 given, at most 26 (A-Z) are supported: remove 1 of them"),
    "budget 0": ((None, "What?", "--budget", 0), "--budget 0 must be a positive number of tokens: give 1 or more"),
    "budget negative": ((None, "What?", "--budget", -3), "--budget -3 must be a positive number of tokens"),
    "start after the end": ((None, "What?", "--start", 30), "start=30 s is at or beyond the end of"),
    "end before the start": ((None, "What?", "--start", 1, "--end", 0.5),
                             "end (0.5 s) must be greater than start (1 s)"),
}


@needs_bundled
@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_bad_input_is_one_line_on_stderr_with_exit_2(odd, case):
    args, message = BAD_CLI[case]
    video = args[0] if args[0] is not None else odd["spaces and non-ASCII"]
    r = _cli("ask", video, *args[1:], *SMALL[:2], timeout=120)
    err = r.stderr.decode(errors="replace")
    lines = [ln for ln in err.splitlines() if ln.startswith("adapttoken:")]
    assert r.returncode == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not r.stdout
    assert "Loading weights" not in err          # refused before the model loads
