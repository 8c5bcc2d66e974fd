"""Key moments (adapttoken/evidence.py) and many questions per video (ask --questions).

Checked against independent references: each moment's decoded frame carries the frame number drawn
into the test video, its time is the plan's, its score is the sum of its kept tokens' probe scores
recomputed from the group passes; with the bundled model the best moment lies on the needle; a
question list decodes and encodes the video once."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import adapttoken as at
from adapttoken.defaults import default_model_dir
from adapttoken.evidence import key_moments, moment_frames

pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "adapttoken" / "assets" / "sample.mp4"
OPTIONS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    from videos import write_video
    return write_video(tmp_path_factory.mktemp("v") / "numbered.mp4", 200, width=112, height=112,
                       fps=10)


def _select(model, path, frames=64, group_size=4, budget=40, method="adapttoken"):
    cfg = at.AdaptTokenConfig(num_frames=frames, group_size=group_size, budget=budget,
                              max_pixels=112 * 112, decode_workers=0)
    video = at.prepare(model, str(path), cfg)
    return at.select(model, video, at.Question("What is shown?", OPTIONS), cfg, method)


def test_moments_are_the_right_frames_at_the_right_times(tiny_model, numbered):
    from videos import frame_number
    sel = _select(tiny_model, numbered)
    ms = key_moments(sel, 6)
    assert 1 <= len(ms) <= 6
    plan = sel.features.video.plan
    frames = moment_frames(sel, ms)
    assert frames.shape[1:] == (112, 112, 3)
    for m, img in zip(ms, frames):
        assert frame_number(img.numpy()) == m["frame"] == int(plan.indices[m["position"]])
        assert m["time"] == pytest.approx(float(plan.timestamps[m["position"]]), abs=1e-4)
        assert m["position"] == m["slice"] * sel.features.video.frames_per_slice
    # scores: the sum over the slice's kept tokens of their scores in their group's pass
    tps = sel.features.tokens_per_slice
    passes = {d.group: d.pass_ for d in sel_passes(tiny_model, numbered)}
    ref = {}
    for gid in sel.gids.tolist():
        for p in passes.values():
            hit = (p.gids == gid).nonzero()
            if len(hit):
                ref[gid // tps] = ref.get(gid // tps, 0.0) + float(p.scores[hit[0, 0]])
                break
    for m in ms:
        assert m["score"] == pytest.approx(ref[m["slice"]], rel=1e-5, abs=1e-6)
    best = sorted(ref.values(), reverse=True)[:len(ms)]
    assert [m["score"] for m in ms] == pytest.approx(best, rel=1e-5, abs=1e-6)   # best first


def sel_passes(model, path):
    """The group passes of the same selection, run again from scratch (memoised per RankedGroups)."""
    cfg = at.AdaptTokenConfig(num_frames=64, group_size=4, budget=40, max_pixels=112 * 112,
                              decode_workers=0)
    video = at.prepare(model, str(path), cfg)
    groups = at.split_groups(video, 4)
    ranked = at.RankedGroups(model, groups, at.Question("What is shown?", OPTIONS))
    return [at.score_groups(ranked).score(g) for g in range(len(groups))]


def test_uniform_frames_count_tokens(tiny_model, numbered):
    sel = _select(tiny_model, numbered, budget=64, method="uniform")
    ms = key_moments(sel, 3)
    tps = sel.features.tokens_per_slice
    assert [m["tokens"] for m in ms] == [tps] * 3 and [m["score"] for m in ms] == [tps] * 3
    assert [m["time"] for m in ms] == sorted(m["time"] for m in ms)       # ties: earliest first


def test_the_bundled_model_points_at_the_needle():
    model = at.load_model(default_model_dir())
    needle = json.loads((SAMPLE.parent / "sample.json").read_text())["needles"][0]
    q = json.loads((SAMPLE.parent / "sample.json").read_text())["questions"][0]
    cfg = at.AdaptTokenConfig(num_frames=512, group_size=16, budget=64)
    res = at.ask(model, str(SAMPLE), q["text"], q["options"], config=cfg)
    best = res.evidence[0]
    assert needle["frame_start"] - 2 <= best["frame"] <= needle["frame_end"]
    assert set(best) >= {"time", "frame", "group", "score", "tokens"}


def test_a_question_list_decodes_the_video_once(tmp_path, capsys):
    from adapttoken.cli import main
    qs = tmp_path / "q.jsonl"
    qs.write_text("\n".join(json.dumps(d) for d in [
        {"id": "a", "question": "What coloured object appeared in the video?", "options": list(OPTIONS)},
        {"question": "Which colour was the shape?", "options": ["blue", "red", "yellow", "green"]},
        {"id": "open", "question": "What colour was the object?"}]) + "\n")
    assert main(["ask", str(SAMPLE), "--questions", str(qs), "--frames", "256", "--group-size", "8",
                 "--budget", "64", "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert [r["id"] for r in rows] == ["a", "2", "open"]
    assert rows[0]["decoded_frames"] == 256 and rows[0]["encoded_slices"] == 128
    assert all(r["decoded_frames"] == 0 and r["encoded_slices"] == 0 for r in rows[1:])
    assert rows[2]["options"] == [] and rows[0]["evidence"]


def test_a_bad_question_file_names_the_line(tmp_path, capsys):
    from adapttoken.cli import main
    qs = tmp_path / "q.jsonl"
    qs.write_text('{"question": "ok?"}\n{"options": ["a"]}\n')
    assert main(["ask", str(SAMPLE), "--questions", str(qs)]) == 2
    assert 'q.jsonl line 2 has no "question"' in capsys.readouterr().err
    assert main(["ask", str(SAMPLE)]) == 2
    assert "no question" in capsys.readouterr().err
