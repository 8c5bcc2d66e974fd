"""The eval readers on tiny data sets written in each benchmark's exact on-disk layout, and the
subtitle readers. No model."""
from __future__ import annotations

import json

import pytest

from adapttoken.errors import InputError
from adapttoken.eval import subtitles as subs
from adapttoken.eval.data import load_items

import eval_fixtures as fx


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    return fx.make_videos(tmp_path_factory.mktemp("evvids"), 4)


def _golds(vids):
    return [a for v in vids for (_, _, a) in v["qs"]]


def test_videomme_parquet_and_extension_fallbacks(tmp_path, vids):
    fx.write_videomme(tmp_path, vids, exts={1: ".MP4", 2: ".mkv", 3: None})
    items = load_items("videomme", tmp_path)
    assert [it.qid for it in items][:2] == ["000-1", "000-2"] and len(items) == 8
    assert [it.answer for it in items] == _golds(vids)
    assert items[0].options == vids[0]["qs"][0][1] and items[0].options_raw[0].startswith("A. ")
    assert items[2].video.endswith("vm001.MP4") and items[4].video.endswith("vm002.mkv")
    assert items[6].video == ""                                   # missing: preflight lists it
    assert [it.fields["duration"] for it in items[::2]] == ["short", "medium", "long", "short"]


def test_mlvu_original_json_text_answers(tmp_path, vids):
    fx.write_mlvu_json(tmp_path, vids)
    items = load_items("mlvu", tmp_path)
    assert len(items) == 8                                        # 9_summary (generation) left out
    assert {it.fields["task"] for it in items} == {"plotQA", "needle"}   # findNeedle -> needle
    by = {it.qid: it for it in items}
    it = by["2_needle/0"]
    assert it.video.endswith("video/2_needle/mlvu_1.mp4") and it.answer == vids[1]["qs"][0][2]
    assert it.question_raw.startswith("Question: ") and "\n(A) " in it.question_raw


def test_mlvu_lmms_eval_parquet_letters(tmp_path, vids):
    fx.write_mlvu_parquet(tmp_path, vids)
    items = load_items("mlvu", tmp_path)
    assert [it.answer for it in items] == _golds(vids)
    assert items[0].options == vids[0]["qs"][0][1] and items[0].question == vids[0]["qs"][0][0]
    assert items[0].video.endswith("mlvu/mlvu_0.mp4") and items[2].fields["task"] == "needle"


@pytest.mark.parametrize("form", ["json", "parquet"])
def test_longvideobench_json_and_parquet(tmp_path, vids, form):
    fx.write_lvb(tmp_path, vids, form=form, subtitles=True, five=True)
    items = load_items("longvideobench", tmp_path)
    assert [it.answer for it in items] == _golds(vids)
    assert len(items[0].options) == 5 and len(items[1].options) == 4     # "N/A" dropped
    assert items[0].fields["duration_group"] == 15 and items[2].fields["duration_group"] == 60
    assert items[0].video.endswith("videos/lvb0.mp4") and items[0].subtitles.endswith("lvb0_en.json")
    assert items[0].subtitle_offset == 10.0


@pytest.mark.parametrize("form,folder", [("meta", ""), ("flat", "videos")])
def test_lvbench_meta_and_flat(tmp_path, vids, form, folder):
    fx.write_lvbench(tmp_path, vids, form=form, folder=folder)
    items = load_items("lvbench", tmp_path)
    assert [it.answer for it in items] == _golds(vids)
    assert items[0].options == vids[0]["qs"][0][1] and items[0].question == vids[0]["qs"][0][0]
    assert items[1].fields["question_type"] == ["event understanding", "reasoning"]
    assert items[0].video.endswith("yt0000.mp4") and items[0].qid == "00"


def test_generic_jsonl_letter_or_text_answers(tmp_path, vids):
    p = fx.write_generic(tmp_path, vids)
    items = load_items("jsonl", p)
    assert [it.answer for it in items] == _golds(vids) and items[0].video.endswith("clips/c0.mp4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "x.mp4", "question": "q", "options": ["a", "b"], "answer": "zebra"}) + "\n")
    with pytest.raises(InputError, match="answer 'zebra'"):
        load_items("jsonl", bad)
    with pytest.raises(InputError, match="no parquet"):
        load_items("videomme", tmp_path / "clips")


def test_subtitles_srt_font_and_lvb_shapes(tmp_path, vids):
    fx.write_videomme(tmp_path, vids[:1], srt=True)
    lines = subs.read_srt(tmp_path / "subtitle" / "vm000.srt")
    assert [t for _, _, t in lines] == ["hello there", "second line", "after the end"]
    assert subs.subtitles_at(lines, [0.5, 1.8, 3.0]) == ["hello there", "second line"]
    fx.write_lvb(tmp_path, vids[:2], subtitles=True)
    a = subs.read_lvb_json(tmp_path / "subtitles" / "lvb0_en.json", offset=10.0, duration=4.0)
    assert a == [(0.0, 1.5, "first"), (pytest.approx(1.6), 4.0, "to the end")]   # minus the offset
    b = subs.read_lvb_json(tmp_path / "subtitles" / "lvb1_en.json", offset=10.0)
    assert b[0] == (0.0, 1.5, "first") and subs.subtitles_at(b, [1.0, 3.0]) == ["first"]
