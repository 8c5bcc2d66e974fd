"""The eval harness's answer parsers (golden cases from each convention's rules, docs/EVAL.md),
metrics against hand-computed values, re-scoring and the paper-figures rule. No model."""
from __future__ import annotations

import json

import pytest

from adapttoken.eval import metrics, profiles, report
from adapttoken.eval.data import Item

ABCD = list("ABCD")


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("C.", "C"), ("The best answer is C.", "C"), ("The answer is D", "D"), ("(D)", "D"),
    ("", ""), ("   ", ""),
    ("it is not possible to tell from these few frames what colour it had", ""),   # >10 words, no letter
    ("Because the man is red", "B"),      # the first capital A-D anywhere: the original rule's quirk
    ("answer: c", ""),                    # lower case is not a letter there
    ("Answer: B", "A"),                   # ... and 'A' of 'Answer' comes first
])
def test_flexselect_videomme_lvbench_first_letter(text, want):
    for bench in ("videomme", "lvbench"):
        assert profiles.parse("flexselect2025", bench, text, ABCD) == want


@pytest.mark.parametrize("text,want", [
    ("B) the red one", "B"), ("(C) green", "C"), ("A", "A"), ("A.", ""), ("red", ""), (")", ""),
])
def test_flexselect_mlvu_char_before_paren(text, want):
    assert profiles.parse("flexselect2025", "mlvu", text, ABCD) == want


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("A. red", "A"),
    ("I think the answer is B", "B"),                        # end of text
    ("C is wrong; the answer is B because it is red", "C"),  # start of text beats the phrase
    ("Answer: (B) red", "B"),                                # answer phrase
    ("It shows (D) clearly", "D"), ("", ""), ("none of them", ""),
    ("Answer: B", "B"),
])
def test_lmms_eval_priority_parser(text, want):
    for bench in ("videomme", "mlvu", "lvbench"):
        assert profiles.parse("lmms_eval", bench, text, ABCD) == want


@pytest.mark.parametrize("profile", ["flexselect2025", "lmms_eval"])
@pytest.mark.parametrize("text,want", [("E", "E"), ("The correct answer is E", "E"), ("no idea", ""),
                                       ("Best option: (B)", "B")])
def test_longvideobench_parse_no_random_fallback(profile, text, want):
    assert profiles.parse(profile, "longvideobench", text, list("ABCDE")) == want


def _item(bench, **kw):
    base = dict(bench=bench, qid="q", video_id="v", video="", question="What colour?",
                options=["red", "blue", "green", "yellow"], answer="B")
    base.update(kw)
    return Item(**base)


def test_prompt_texts_and_new_tokens():
    vm = _item("videomme", options_raw=["A. red", "B. blue", "C. green", "D. yellow"])
    t = profiles.prompt_text("flexselect2025", vm)
    assert t == (profiles.VIDEOMME_HEAD + "\nWhat colour?\nA. red\nB. blue\nC. green\nD. yellow\n\n"
                 "Answer with the option's letter from the given choices directly.")
    assert profiles.prompt_text("lmms_eval", vm) == t
    ml = _item("mlvu", question_raw="Question: What colour?\nOptions:\n(A) red\n(B) blue")
    assert profiles.prompt_text("flexselect2025", ml).endswith(
        "(B) blue\nAnswer with the best option's letter from the given choices directly.\nBest option: (")
    assert profiles.prompt_text("lmms_eval", ml) == ml.question_raw + "\nOnly give the best option.\nBest option: ("
    lvb = _item("longvideobench")
    assert profiles.prompt_text("lmms_eval", lvb) == ("What colour?\nA. red\nB. blue\nC. green\nD. yellow\n"
                                                      "Answer with the option's letter from the given choices directly.\n")
    lv = _item("lvbench", question_raw="What colour?\n(A) red\n(B) blue\n(C) green\n(D) yellow")
    assert profiles.prompt_text("lmms_eval", lv).endswith("(D) yellow\nAnswer the question with the option letter")
    assert "(A)" not in profiles.prompt_text("flexselect2025", lv)
    assert profiles.prompt_text("flexselect2025", lv).startswith(profiles.LVBENCH_HEAD_FLEX)
    sub = profiles.prompt_text("flexselect2025", vm, ["hello", "there"])
    assert sub.startswith(profiles.SUBTITLE_HEAD + "\nhello\nthere\n" + profiles.VIDEOMME_HEAD)
    assert [profiles.max_new_tokens("flexselect2025", b) for b in ("videomme", "mlvu", "longvideobench", "lvbench")] == [1, 16, 1, 1]
    assert [profiles.max_new_tokens("lmms_eval", b) for b in ("videomme", "mlvu", "longvideobench", "lvbench")] == [16, 16, 32, 16]
    q = profiles.question_for("lmms_eval", lv)
    assert q.letters == ("A", "B", "C", "D") and q.prompt_text() == profiles.prompt_text("lmms_eval", lv)


def _row(correct, **fields):
    return {"correct": correct, "fields": fields, "letter": "A" if correct else "B", "error": None}


def test_wilson_known_values():
    lo, hi = metrics.wilson(3, 5)
    assert (round(lo, 4), round(hi, 4)) == (0.2307, 0.8824)
    assert metrics.wilson(0, 10)[0] == 0.0 and round(metrics.wilson(0, 10)[1], 4) == 0.2775


def test_mlvu_macro_not_micro():
    rows = [_row(True, task="plotQA"), _row(True, task="needle"), _row(False, task="needle"),
            _row(False, task="needle")]
    m = metrics.compute("mlvu", rows)
    assert m["by_task"]["plotQA"]["acc"] == 1.0 and m["by_task"]["needle"]["acc"] == pytest.approx(1 / 3)
    assert m["main"]["acc"] == pytest.approx((1 + 1 / 3) / 2)        # M-Avg 66.7
    assert m["micro_avg"]["acc"] == 0.5                               # micro 50.0


def test_lvbench_multilabel_counts_in_each_type():
    rows = [_row(True, question_type=["reasoning", "event understanding"]),
            _row(False, question_type=["event understanding"]), _row(False, question_type=["reasoning"])]
    m = metrics.compute("lvbench", rows)
    assert m["overall"]["acc"] == pytest.approx(1 / 3) and m["overall"]["n"] == 3
    assert m["by_question_type"]["reasoning"]["n"] == 2 and m["by_question_type"]["reasoning"]["acc"] == 0.5
    assert m["by_question_type"]["event understanding"]["acc"] == 0.5


def test_videomme_durations_and_errors_count_as_wrong():
    rows = [_row(True, duration="short"), _row(True, duration="short"), _row(True, duration="medium"),
            _row(False, duration="medium"), {**_row(False, duration="long"), "error": "missing", "letter": ""}]
    m = metrics.compute("videomme", rows)
    assert m["main"]["acc"] == 0.6 and m["errors"] == 1 and m["parse_failures"] == 0
    assert {k: v["acc"] for k, v in m["by_duration"].items()} == {"long": 0.0, "medium": 0.5, "short": 1.0}
    rows[3]["letter"] = ""
    assert metrics.compute("videomme", rows)["parse_failures"] == 1


def _fake_run(tmp_path, config_name, raws):
    out = tmp_path / config_name
    (out / "preds").mkdir(parents=True)
    fp = {"bench": "videomme", "profile": "flexselect2025", "config_name": config_name, "num_frames": 4096,
          "budget": 7040, "max_pixels": 172480, "min_pixels": None, "group_size": 64, "stop_threshold": 0.2,
          "native_frames": 32, "native_max_pixels": 1605632, "native_min_pixels": None, "subtitles": False,
          "seed": 0, "model": "Qwen2.5-VL-7B-Instruct"}
    (out / "run.json").write_text(json.dumps({"fingerprint": fp, "spec": {}}))
    rows = []
    for i, raw in enumerate(raws):
        letter = profiles.parse("flexselect2025", "videomme", raw, ABCD)
        rows.append({"qid": f"q{i}", "method": "adapttoken", "gold": "B", "n_options": 4, "raw": raw,
                     "letter": letter, "correct": letter == "B", "error": None, "fields": {"duration": "short"},
                     "cold": i == 0, "wall_s": 1.0, "seconds": {"decode": 0.5, "answer": 0.5},
                     "group_passes": 3, "option_probs": {"A": 0.1, "B": 0.9}, "argmax": "B"})
    (out / "preds" / "worker0-of-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_rescore_under_another_profile_and_paper_figures_only_for_paper(tmp_path):
    out = _fake_run(tmp_path, "paper", ["Answer: B", "B", "The best answer is B"])
    s = report.write(out)
    assert s["methods"]["adapttoken"]["metrics"]["main"]["acc"] == pytest.approx(2 / 3)
    assert "70.5" in (out / "report.md").read_text()             # the paper's AdaptToken figure
    s2 = report.write(out, profile="lmms_eval")                   # 'Answer: B' parses as B there
    assert s2["methods"]["adapttoken"]["metrics"]["main"]["acc"] == 1.0
    assert (out / "report.lmms_eval.md").exists() and (out / "accuracy.lmms_eval.png").exists()
    custom = _fake_run(tmp_path, "custom", ["B"])
    report.write(custom)
    assert "70.5" not in (custom / "report.md").read_text()
    assert json.loads((custom / "report.json").read_text())["methods"]["adapttoken"].get("paper") is None
