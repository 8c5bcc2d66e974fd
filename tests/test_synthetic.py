"""Synthetic long-video QA data: determinism, real decodable files, visible needles, grey distractors,
consistent questions, bounded memory while writing."""
from __future__ import annotations

import json
import re
import tracemalloc

import numpy as np
import pytest

from adapttoken.training import synthetic as S

NEEDLE_SAT = 150  # every palette colour has max-min >= 150 over RGB
GREY_SAT = 60     # background and distractors stay far below, even after compression


def _inner(needle: S.Needle, erode: int = 3) -> np.ndarray:
    """Mask of the needle's pixels at least `erode` px inside the shape (away from chroma bleed)."""
    from numpy.lib.stride_tricks import sliding_window_view
    k = 2 * erode + 1
    return sliding_window_view(np.pad(needle.mask(), erode), (k, k)).all(axis=(-1, -2))


def _outside(num_frames: int, needles) -> np.ndarray:
    keep = np.ones(num_frames, bool)
    for n in needles:
        keep[n.frame_start:n.frame_end] = False
    return keep


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A 240-frame count video (several needles of two colours) written with the default codec."""
    path = tmp_path_factory.mktemp("syn") / "count.mp4"
    return S.make_sample(path, 240, seed=7, kind="count", form="both", count=3, decoys=1)


@pytest.fixture(scope="module")
def decoded(sample):
    return S.read_video(sample.video_path)


def test_frames_deterministic_per_seed_and_chunking():
    needles, _ = S.plan(90, 3, "order")
    a = S.make_frames(90, 3, needles=needles)
    b = S.make_frames(90, 3, needles=needles, chunk=7)  # other chunking, same bytes
    assert a.dtype == np.uint8 and a.shape == (90, *S.DEFAULT_SIZE, 3)
    assert np.array_equal(a, b)
    part = np.concatenate(list(S.iter_frames(90, 3, needles=needles, start=40, stop=70, chunk=11)))
    assert np.array_equal(part, a[40:70])
    assert not np.array_equal(a, S.make_frames(90, 4, needles=needles))


def test_plan_deterministic_and_seeds_differ():
    for kind in S.KINDS:
        assert S.plan(500, 11, kind, "both") == S.plan(500, 11, kind, "both")
        plans = {repr(S.plan(500, s, kind, "mc")) for s in range(10)}
        assert len(plans) == 10


def test_mc_letters_cover_all_positions_and_answers_are_consistent():
    letters = set()
    for seed in range(40):
        for kind in S.KINDS:
            needles, (mc, op) = S.plan(400, seed, kind, "both")
            assert len(mc.options) == 4 and len(set(mc.options)) == 4 and op.options == ()
            assert mc.options[S.LETTERS.index(mc.answer)] == mc.answer_text == op.answer == op.answer_text
            assert mc.text == op.text
            letters.add(mc.answer)
            if kind == "what":
                (n,) = needles
                want = {"colour": n.colour, "shape": n.shape, "both": f"{n.colour} {n.shape}"}[mc.attribute]
                assert mc.answer_text == want
            elif kind == "order":
                first = min(needles, key=lambda n: n.frame_start)
                assert len({n.colour for n in needles}) == 2 and mc.answer_text == first.colour
                assert all(n.colour in mc.text for n in needles)
            else:
                target = re.search(r"did a (\w+) object", mc.text).group(1)
                assert mc.answer_text == str(sum(n.colour == target for n in needles))
            spans = sorted((n.frame_start, n.frame_end) for n in needles)
            assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # no overlap in time
            for n in needles:
                y0, y1, x0, x1 = n.box
                assert 0 <= y0 and y1 <= 112 and 0 <= x0 and x1 <= 112
                assert 4 <= n.frame_end - n.frame_start <= 8
    assert letters == set(S.LETTERS)


def test_written_video_decodes_to_every_frame(sample, decoded):
    assert decoded.shape == (sample.num_frames, *S.DEFAULT_SIZE, 3)
    frames = S.make_frames(sample.num_frames, sample.seed, needles=sample.needles)
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 4  # near-lossless


def test_needles_visible_after_decoding(sample, decoded):
    assert len(sample.needles) == 4
    for n in sample.needles:
        y0, y1, x0, x1 = n.box
        for t in range(n.frame_start, n.frame_end):
            px = decoded[t, y0:y1, x0:x1][_inner(n)].astype(np.float32)
            mean = px.mean(axis=0)
            assert np.linalg.norm(mean - np.asarray(n.rgb)) < 25, (n, t, mean)
            assert S.nearest_colour(mean) == n.colour


def test_no_needle_colour_outside_needle_frames(sample, decoded):
    outside = decoded[_outside(sample.num_frames, sample.needles)]
    assert S.saturation(outside).max() < GREY_SAT
    assert min(S.saturation(np.asarray(c)[None, None]).item() for c in S.COLOURS.values()) >= NEEDLE_SAT


def test_distractors_move_and_flash():
    sc = S.Scene(400, 2)
    assert sc.flashes  # grey events of needle size exist in a long scene
    s, e, shape, y0, x0, size, grey = sc.flashes[0]
    frames = sc.render(0, 400)
    plain = S.Scene(400, 2, distractors=False).render(0, 400)
    assert not np.array_equal(frames, plain)
    assert S.saturation(frames).max() < GREY_SAT
    assert np.all(frames[s, y0:y0 + size, x0:x0 + size][S.shape_mask(shape, size)] == grey)
    assert np.abs(frames[1:].astype(np.int16) - frames[:-1]).mean() > 0.5  # the background drifts


def test_render_at_scattered_frames_equals_the_whole_render():
    """Training draws scattered frames in one call: each equals the same frame of a whole render
    (background drift, blobs, grey flashes and needles alike), in the order asked."""
    needles = [S.Needle(30, 36, "red", "circle", 40, 50, 40), S.Needle(200, 201, "blue", "cross", 70, 60, 30)]
    sc = S.Scene(400, 7, needles=needles, flash_rate=0.1)
    whole = sc.render(0, 400)
    picked = [399, 0, 31, 35, 36, 200, 200, 201] + [s for s, *_ in sc.flashes]
    assert np.array_equal(sc.render_at(picked), whole[picked])
    assert sc.render_at([]).shape == (0, 112, 112, 3)
    with pytest.raises(ValueError, match="within"):
        sc.render_at([400])


def test_needle_frames_override_and_errors(tmp_path):
    smp = S.make_sample(tmp_path / "a.mp4", 120, 1, kind="order", form="open", needle_frames=[90, 10])
    assert [n.frame_start for n in smp.needles] == [10, 90]
    assert smp.questions[0].answer == smp.needles[0].colour
    with pytest.raises(ValueError, match="overlap"):
        S.plan(120, 1, "order", needle_frames=[10, 12])
    with pytest.raises(ValueError, match="needs 1"):
        S.plan(120, 1, "what", needle_frames=[10, 50])
    with pytest.raises(ValueError, match="do not fit"):
        S.plan(10, 1, "count", count=4)
    with pytest.raises(ValueError, match="kind"):
        S.plan(100, 1, "why")


def test_sample_roundtrips_through_json(sample):
    back = S.Sample.from_dict(json.loads(json.dumps(sample.to_dict())))
    assert back == sample


def test_clip_with_and_without_needle():
    f1, q1, a1 = S.make_clip(5, 16, True, kind="what", form="mc")
    f0, q0, a0 = S.make_clip(5, 16, False, kind="what", form="mc")
    needles, q = S.plan_clip(5, 16, True, kind="what")
    assert q == q1 and a1 == q1.answer in S.LETTERS
    assert a0 is None and q0.text == q1.text and q0.options == q1.options
    assert f1.shape == f0.shape == (16, 112, 112, 3)
    assert S.saturation(f0).max() < GREY_SAT  # no evidence at all
    assert S.saturation(f1).max() >= NEEDLE_SAT
    diff = np.any(f1 != f0, axis=-1)  # same scene apart from the needle
    (n,) = needles
    y0, y1, x0, x1 = n.box
    assert not diff[:, :y0].any() and not diff[:, y1:].any() and not diff[:, :, :x0].any()
    assert np.array_equal(np.flatnonzero(diff.any(axis=(1, 2))), np.arange(n.frame_start, n.frame_end))
    assert S.make_clip(5, 16, True, kind="what")[1] == q1 and np.array_equal(S.make_clip(5, 16, True)[0], f1)


def test_clip_count_fits_and_roundtrip():
    for seed in range(6):
        frames, q, a = S.make_clip(seed, 16, True, kind="count", form="open")
        needles, _ = S.plan_clip(seed, 16, True, kind="count", form="open")
        assert a == q.answer_text and 1 <= int(a) <= 3 and len(needles) >= int(a)
    frames, q, a = S.make_clip(3, 8, True, kind="what", roundtrip=True)
    raw, _, _ = S.make_clip(3, 8, True, kind="what")
    assert frames.shape == raw.shape and np.abs(frames.astype(np.int16) - raw).mean() < 4


def test_vocab_texts_cover_every_prompt():
    vocab = set(" ".join(S.VOCAB_TEXTS).replace("\n", " ").split())
    for seed in range(100, 130):
        for kind in S.KINDS:
            for q in S.plan(300, seed, kind, "both")[1]:
                words = set(q.prompt_text().replace("\n", " ").split()) | set(q.answer.split())
                assert words <= vocab, words - vocab
    assert all(isinstance(t, str) and t for t in S.VOCAB_TEXTS)


def test_prompt_layout_matches_model_question():
    question = pytest.importorskip("adapttoken.question")
    _, (mc, op) = S.plan(300, 2, "order", "both")
    assert mc.prompt_text() == question.Question(mc.text, mc.options).prompt_text()
    assert op.prompt_text() == question.Question(op.text).prompt_text()


def test_needle_tokens_on_the_28px_grid():
    n = S.Needle(0, 4, "red", "square", x=42, y=42, size=28)  # box 28..56: exactly token (1, 1)
    assert n.tokens() == [(1, 1)]
    assert S.Needle(0, 4, "red", "square", x=28, y=28, size=28).tokens() == [(0, 0), (0, 1), (1, 0), (1, 1)]


def _write_peak(path, num: int, chunk: int) -> tuple[int, list[int]]:
    sizes = []

    def frames():
        for c in S.iter_frames(num, 9, chunk=chunk):
            sizes.append(len(c))
            yield c

    tracemalloc.start()
    try:
        S.write_video(path, frames(), fps=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, sizes


def test_chunked_write_bounded_memory(tmp_path):
    """Peak Python memory while writing depends on the chunk, not on the length: 4x the frames
    (1200 frames = 45 MB as one array) costs no more memory than 300."""
    chunk = 64
    short, _ = _write_peak(tmp_path / "short.mp4", 300, chunk)
    peak, sizes = _write_peak(tmp_path / "long.mp4", 1200, chunk)
    assert max(sizes) == chunk and sum(sizes) == 1200
    assert peak < 1.2 * short + 1_000_000, (peak, short)
    assert peak < 1200 * 112 * 112 * 3 / 3, peak
    import av
    with av.open(str(tmp_path / "long.mp4")) as c:
        assert sum(1 for p in c.demux(video=0) if p.size) == 1200
