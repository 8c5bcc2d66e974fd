"""The benchmarking aids of `eval` end to end on the CPU: `eval make-synthetic videomme` writes a set
in VideoMME's layout, `eval videomme --arch tiny --lite-stop-fraction F` runs it with random
weights, Lite stops after exactly round(F x groups) groups, and the report gives the seconds per
question cold and warm with their shares, the paper's seconds, and says accuracy means nothing."""
from __future__ import annotations

import json

import pytest

from adapttoken.bench.eval_aids import fixed_stop_k, parse_resolution
from adapttoken.errors import InputError
from adapttoken.eval.command import main as eval_main
from adapttoken.eval.data import load_items
from adapttoken.eval.runner import read_rows

SMALL = ["--frames", "16", "--budget", "64", "--max-pixels", "12544", "--group-size", "2",
         "--native-frames", "8", "--native-max-pixels", "12544", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("vmme_syn")
    assert eval_main(["make-synthetic", "videomme", "--out", str(d), "--videos", "2", "--questions", "2",
                      "--frames", "48", "--resolution", "224x128", "--fps", "8"]) == 0
    return d


def test_make_synthetic_writes_videomme_layout(data):
    from adapttoken.video import probe_video
    assert (data / "videomme" / "test-00000-of-00001.parquet").exists()
    items = load_items("videomme", str(data))
    assert len(items) == 4 and len({it.video for it in items}) == 2
    assert all(it.video.endswith(".mp4") and it.answer in "ABCD" and len(it.options) == 4 for it in items)
    assert items[0].fields["duration"] == "short"
    info = probe_video(items[0].video)
    assert (info.width, info.height, info.num_frames) == (224, 128, 48)
    m = json.loads((data / "synthetic.json").read_text())
    assert m["width"] == 224 and m["height"] == 128 and m["fps"] == 8


def test_speed_run_with_random_tiny_arch(data, tmp_path):
    out = tmp_path / "run"
    assert eval_main(["videomme", "--data", str(data), "--arch", "tiny", "--lite-stop-fraction", "0.5",
                      "--method", "native", "adapttoken", "lite", "--out", str(out), *SMALL]) == 0
    rows, _ = read_rows(out)
    assert len(rows) == 12 and not any(r["error"] for r in rows)
    # 16 frames = 8 two-frame slices in groups of 2 = 4 groups; Lite stops after round(0.5 x 4) = 2
    for r in rows:
        if r["method"] == "lite":
            assert (r["group_passes"], r["skipped_groups"]) == (2, 2)
        elif r["method"] == "adapttoken":
            assert (r["group_passes"], r["skipped_groups"]) == (4, 0)
    assert {r["cold"] for r in rows if r["method"] != "native"} == {True, False}
    rep = json.loads((out / "report.json").read_text())
    assert rep["random_weights"] and rep["fingerprint"]["lite_stop_fraction"] == 0.5
    assert rep["warmup"] and rep["built_models"][0]["arch"] == "tiny"
    for m in ("native", "adapttoken", "lite"):
        sh = rep["methods"][m]["timing"]["cold"]["wall_share"]
        assert set(sh) == {"decode", "vision", "group_pass", "answer", "other"}
        assert sum(sh.values()) >= 1 - 1e-6          # "other" takes the rest (0 if over)
        assert rep["methods"][m]["timing"]["warm"]["seconds"] is not None
        assert "paper" not in rep["methods"][m]                       # no accuracy claims
    assert rep["methods"]["lite"]["paper_seconds"] == 8.6
    assert rep["methods"]["adapttoken"]["paper_seconds"] == 17.8
    md = (out / "report.md").read_text()
    assert "Random weights answer at random" in md and "Lite's stop is fixed" in md
    for col in ("| decode | vision | group passes | answer |", "paper s/q", "| cold |", "| warm |"):
        assert col in md
    # a resume with another stop fraction is refused
    with pytest.raises(InputError, match="lite_stop_fraction"):
        eval_main(["videomme", "--data", str(data), "--arch", "tiny", "--lite-stop-fraction", "0.25",
                   "--method", "lite", "--out", str(out), *SMALL])


def test_aid_arguments_checked(data, tmp_path):
    with pytest.raises(InputError, match="leave --model out"):
        eval_main(["videomme", "--data", str(data), "--arch", "tiny", "--model", "x",
                   "--out", str(tmp_path / "a"), *SMALL])
    with pytest.raises(InputError, match="within"):
        eval_main(["videomme", "--data", str(data), "--lite-stop-fraction", "1.5",
                   "--out", str(tmp_path / "b"), *SMALL])
    assert parse_resolution("1280x720") == (720, 1280)
    assert [fixed_stop_k(g, 0.25) for g in (1, 4, 8, 10, 32)] == [1, 1, 2, 2, 8]


def test_help_labels_the_aids(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    text = capsys.readouterr().out
    assert "benchmarking aids" in text and "--lite-stop-fraction" in text and "--arch" in text
