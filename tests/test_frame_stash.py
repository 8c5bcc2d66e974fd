"""Lite's frame stash: reads take the next groups' frames on the way (FrameReader.read(extra=...)).

The frames carry their numbers (tests/videos.py), so every captured frame is checked to be the
frame it claims to be; Lite with the stash must give exactly the result it gives without it."""
from __future__ import annotations

import numpy as np
import pytest

import adapttoken as at
from adapttoken.frame_reader import SEEK_COST_FRAMES, FrameReader, plan_extras

from videos import frame_number, write_video

try:
    import decord  # noqa: F401
    BACKENDS = ["pyav", "decord"]
except ImportError:  # pragma: no cover
    BACKENDS = ["pyav"]


def _kf(gop):
    return lambda i: (i // gop) * gop


def test_plan_extras_takes_what_lies_on_the_way():
    assert SEEK_COST_FRAMES == 10
    kf = _kf(64)
    targets = [0, 1, 64, 65]
    cand = list(range(2, 12)) + [12, 30, 66, 200]
    # 2..11 cost one decoded frame each (10 in all, then the reader seeks to 64 as it would have);
    # 12 and 30 would cost more; 66 is next to the last target; 200 needs a seek of its own.
    assert plan_extras(targets, cand, -1, kf) == list(range(2, 12)) + [66]
    # frames passed anyway on the way to a target cost nothing, however many
    assert plan_extras([0, 60], list(range(1, 60)), -1, kf) == list(range(1, 60))
    # the limit, and nothing without a target
    assert plan_extras(targets, cand, -1, kf, limit=3) == [2, 3, 4]
    assert plan_extras([], cand, -1, kf) == []
    # frames behind the reader are never taken
    assert plan_extras([100], [50, 101], 90, kf) == [101]


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_hands_over_the_right_extra_frames(tmp_path, backend):
    path = write_video(tmp_path / "g16.mp4", 200, codec="libx264", gop=16)
    want = [0, 1, 40, 41, 80, 81]
    got = {}
    with FrameReader(path, backend=backend) as r:
        frames, _ = r.read(want, extra=[i for i in range(200) if i not in want],
                           on_extra=lambda i, f: got.__setitem__(i, f))
    assert [frame_number(f.numpy()) for f in frames] == want
    assert got, "nothing taken on the way"
    assert set(range(2, 12)) <= set(got)
    for i, f in got.items():
        assert frame_number(f.numpy()) == i
    # max_extra bounds what is taken
    got2 = {}
    with FrameReader(path, backend=backend) as r:
        r.read(want, extra=list(range(2, 40)), on_extra=lambda i, f: got2.__setitem__(i, f), max_extra=4)
    assert sorted(got2) == [2, 3, 4, 5]


def _run_lite(model, path, stash_bytes, workers):
    cfg = at.AdaptTokenConfig(num_frames=256, group_size=8, budget=32, max_pixels=56 * 56,
                              min_pixels=56 * 56, stop_threshold=0.0, frame_stash_bytes=stash_bytes,
                              decode_workers=workers, max_new_tokens=2)
    q = at.Question("What is shown?", ("a dog", "a cat", "a car", "a man"))
    return at.ask(model, path, q, config=cfg, method="lite", fresh_features=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_lite_with_stash_equals_lite_without(tiny_model, tmp_path, workers):
    # 256 frames, keyframe every 32: 16 strided groups of 8 slices; group g+1's frames follow g's
    path = write_video(tmp_path / "long.mp4", 256, codec="libx264", gop=32)
    off = _run_lite(tiny_model, path, 0, workers)
    on = _run_lite(tiny_model, path, 2 ** 30, workers)
    assert on.group_passes == off.group_passes == 16       # threshold 0: Lite never stops
    assert [g.entropy for g in on.groups] == pytest.approx([g.entropy for g in off.groups], abs=1e-6)
    assert on.kept_tokens == off.kept_tokens and on.answer == off.answer
    assert on.decoded_frames == off.decoded_frames == 256   # each frame used once either way
    st_on, st_off = on.extra["features"], off.extra["features"]
    assert st_off["ride_along_frames"] == 0
    assert st_on["ride_along_used_frames"] > 0
    assert st_on["ride_along_used_frames"] + st_on["ride_along_wasted_frames"] == st_on["ride_along_frames"]


def test_stash_is_bounded_and_emptied_when_lite_stops(tiny_model, tmp_path):
    path = write_video(tmp_path / "long.mp4", 256, codec="libx264", gop=32)
    frame_bytes = 48 * 64 * 3
    res = _run_lite(tiny_model, path, 5 * frame_bytes, 0)
    st = res.extra["features"]
    assert 0 < st["ride_along_frames"] <= 5 * 16        # never more than 5 frames held per group
    feats = tiny_model.features_for(at.open_video(path, 256, max_pixels=56 * 56, min_pixels=56 * 56))
    assert feats.stash.bytes == 0 and not feats.stash.active
    assert feats.stash.limit == 5 * frame_bytes
    # a stop after the first group: the frames taken for later groups are dropped, not kept
    full = at.ask(tiny_model, path, "What is shown?", config=at.AdaptTokenConfig(
        num_frames=256, group_size=8, budget=32, max_pixels=56 * 56, min_pixels=56 * 56,
        stop_threshold=1.0, stop_confirm=1, stop_check_answer=False, decode_workers=0,
        max_new_tokens=2), method="lite", fresh_features=True)
    assert full.group_passes == 1
    st = full.extra["features"]
    assert st["ride_along_frames"] > 0 and st["ride_along_used_frames"] == 0
    assert st["ride_along_wasted_frames"] == st["ride_along_frames"]
    assert full.encoded_slices == 8                     # group 0 only: 8 of 128 slices


def test_negative_stash_is_refused(tiny_model, tmp_path):
    path = write_video(tmp_path / "short.mp4", 32, codec="libx264", gop=8)
    cfg = at.AdaptTokenConfig(num_frames=32, group_size=4, budget=8, max_pixels=56 * 56,
                              min_pixels=56 * 56, frame_stash_bytes=-1)
    with pytest.raises(at.InputError, match="frame_stash_bytes"):
        at.ask(tiny_model, path, "What?", config=cfg, method="lite", fresh_features=True)
