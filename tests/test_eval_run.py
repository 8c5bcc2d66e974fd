"""The eval harness end to end with the bundled tiny model on the CPU: every layout, error rows for
a missing and a corrupt video, one decode and one vision pass per video and sampling, and runs
killed (SIGKILL) at several points then resumed (also with another number of workers): no
duplicates, the same answers and scores as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from adapttoken.eval import report
from adapttoken.eval.command import run_parser, spec_from_args
from adapttoken.eval.data import load_items
from adapttoken.eval.runner import read_rows, run

import eval_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    import adapttoken as at
    from adapttoken.defaults import default_model_dir
    return at.load_model(default_model_dir(), device="cpu")


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    return fx.make_videos(tmp_path_factory.mktemp("evrun"), 4)


def _spec(bench, data, out, methods, *extra):
    a = run_parser().parse_args([bench, "--data", str(data), "--out", str(out), "--method", *methods,
                                 *fx.TINY_ARGS, *extra])
    return spec_from_args(a)


def _run(model, bench, data, out, methods=("adapttoken", "native"), *extra):
    spec = _spec(bench, data, out, methods, *extra)
    items = load_items(bench, data)
    stats = run(spec, items, model=model)
    return spec, items, stats, report.write(out, None, len(items))


LAYOUTS = [
    ("videomme", lambda r, v: fx.write_videomme(r, v)),
    ("mlvu", lambda r, v: fx.write_mlvu_json(r, v)),
    ("mlvu", lambda r, v: fx.write_mlvu_parquet(r, v)),
    ("longvideobench", lambda r, v: fx.write_lvb(r, v, form="json")),
    ("longvideobench", lambda r, v: fx.write_lvb(r, v, form="parquet")),
    ("lvbench", lambda r, v: fx.write_lvbench(r, v, form="meta")),
    ("lvbench", lambda r, v: fx.write_lvbench(r, v, form="flat", folder="all_videos")),
    ("jsonl", lambda r, v: fx.write_generic(r, v)),
]


@pytest.mark.parametrize("k", range(len(LAYOUTS)),
                         ids=["videomme", "mlvu-json", "mlvu-parquet", "lvb-json", "lvb-parquet",
                              "lvbench-meta", "lvbench-flat", "jsonl"])
def test_each_layout_end_to_end(tmp_path, model, vids, k):
    bench, write = LAYOUTS[k]
    data = tmp_path / "data"
    p = write(data, vids[:2])
    data = p if isinstance(p, Path) else data
    # the plain profile: the prompt layout the tiny model was trained on, so its answers are known
    spec, items, stats, s = _run(model, bench, data, tmp_path / "out", ("adapttoken", "native"),
                                 "--profile", "plain")
    rows, _ = read_rows(tmp_path / "out")
    assert stats["errors"] == 0 and len(rows) == 2 * len(items) == 8
    for r in rows:                               # the stored letter is the parse of the stored raw
        assert r["correct"] == (r["letter"] == r["gold"]) and r["raw"] is not None
        assert set(r["option_probs"]) == set("ABCD"[: r["n_options"]])
    at = s["methods"]["adapttoken"]["metrics"]
    assert at["main"]["acc"] >= 0.75, (bench, [(r["qid"], r["raw"], r["gold"]) for r in rows])
    assert at["parse_failures"] == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| AdaptToken |" in md and "native (baseline)" in md and "s/q cold" in md
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0
    if bench == "mlvu":
        assert "m_avg" in at and set(at["by_task"]) == {"plotQA", "needle"}


def test_second_method_and_question_decode_nothing(tmp_path, model, vids):
    data = tmp_path / "d.jsonl"
    fx.write_generic(tmp_path, vids[:2])
    data = tmp_path / "mine.jsonl"
    methods = ("adapttoken", "lite", "uniform", "even_split", "native")
    _run(model, "jsonl", data, tmp_path / "out", methods)
    rows = [json.loads(l) for l in (tmp_path / "out" / "preds" / "worker0-of-1.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * len(methods)
    per = defaultdict(list)
    for r in rows:                                               # in execution order
        per[(r["video_id"], r["method"] == "native")].append(r)
    for (vid, native), rs in per.items():
        assert sum(r["cold"] for r in rs) == 1 and rs[0]["cold"]
        # every slice of the sampling is encoded exactly once, every frame decoded at most once
        assert sum(r["encoded_slices"] for r in rs) == rs[0]["num_slices"]
        assert sum(r["decoded_frames"] for r in rs) <= rs[0]["num_frames"]
        full = False
        for r in rs:
            if full:                                             # after a full encode: nothing
                assert r["decoded_frames"] == 0 and r["encoded_slices"] == 0, r
            full = full or r["method"] in ("adapttoken", "even_split", "native")
    s = report.summarize(tmp_path / "out")
    assert s["methods"]["uniform"]["timing"]["warm"]["n"] >= 1


def test_missing_and_corrupt_videos_become_error_rows(tmp_path, model, vids):
    p = fx.write_generic(tmp_path, vids[:2])
    (tmp_path / "clips" / "c1.mp4").write_bytes(b"not a video at all" * 100)        # corrupt
    lines = p.read_text().splitlines()
    lines.append(json.dumps({"id": "gone", "video": "clips/nowhere.mp4", "question": "What colour?",
                             "options": ["red", "blue"], "answer": "A"}))          # missing
    p.write_text("\n".join(lines) + "\n")
    spec, items, stats, s = _run(model, "jsonl", p, tmp_path / "out")
    rows, _ = read_rows(tmp_path / "out")
    err = {(r["qid"], r["method"]) for r in rows if r["error"]}
    assert err == {(q, m) for q in ("g1_0", "g1_1", "gone") for m in ("adapttoken", "native")}
    assert stats["errors"] == 6 and len(rows) == 10
    pf = json.loads((tmp_path / "out" / "preflight-worker0-of-1.json").read_text())
    assert set(pf["bad"]) == {"c1", "nowhere"} and "missing" in pf["bad"]["nowhere"]
    assert s["methods"]["adapttoken"]["metrics"]["errors"] == 3
    assert s["methods"]["adapttoken"]["metrics"]["overall"]["n"] == 5     # errors count, as wrong


def test_settings_change_refused_and_limit(tmp_path, model, vids):
    p = fx.write_generic(tmp_path, vids[:2])
    _run(model, "jsonl", p, tmp_path / "out", ("adapttoken",), "--limit", "1")
    assert len(read_rows(tmp_path / "out")[0]) == 1
    from adapttoken.errors import InputError
    with pytest.raises(InputError, match="budget"):
        run(_spec("jsonl", p, tmp_path / "out", ("adapttoken",), "--budget", "32"), load_items("jsonl", p), model=model)


# --- killed and resumed --------------------------------------------------------------------------

def _cli(data, out, *extra):
    return [sys.executable, "-m", "adapttoken", "eval", "jsonl", "--data", str(data), "--out", str(out),
            "--method", "adapttoken", "lite", *fx.TINY_ARGS, *extra]


def _lines(out) -> int:
    return sum(f.read_bytes().count(b"\n") for f in (Path(out) / "preds").glob("*.jsonl")) \
        if (Path(out) / "preds").exists() else 0


def _kill_when(cmd, cond, env, timeout=120):
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if cond():
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait(timeout=30)
    return p.returncode


def test_sigkill_at_several_points_then_resume(tmp_path, model, vids):
    data = fx.write_generic(tmp_path / "d", vids)               # 4 videos x 2 questions x 2 methods
    ref = tmp_path / "ref"
    run(_spec("jsonl", data, ref, ("adapttoken", "lite")), load_items("jsonl", data), model=model)
    want = {(r["qid"], r["method"]): r["letter"] for r in read_rows(ref)[0]}
    assert len(want) == 16

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    # 1: while starting (run.json written, no row yet); 2: after a few rows
    assert _kill_when(_cli(data, out), lambda: (out / "run.json").exists(), env) == -signal.SIGKILL
    assert _kill_when(_cli(data, out), lambda: _lines(out) >= 3, env) == -signal.SIGKILL
    assert 3 <= _lines(out) < 16
    # 3: a kill in the middle of a write leaves half a line
    f = next((out / "preds").glob("*.jsonl"))
    with open(f, "ab") as fh:
        fh.write(b'{"qid": "g3_1", "method": "lite", "letter": "')
    # resume with two workers at once instead of one
    procs = [subprocess.Popen(_cli(data, out, "--workers", "2", "--worker", w), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for w in ("0", "1")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    rows = []
    for f in (out / "preds").glob("*.jsonl"):
        for line in f.read_bytes().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                assert line.startswith(b'{"qid": "g3_1"')           # only the cut line
    keys = [(r["qid"], r["method"]) for r in rows]
    assert Counter(keys).most_common(1)[0][1] == 1                  # no duplicates
    assert {k: r["letter"] for k, r in zip(keys, rows)} == want     # same answers
    from adapttoken.cli import main
    assert main(["eval", "score", str(out)]) == 0
    assert (out / "report.md").exists()
    got, exp = report.summarize(out), report.summarize(ref)
    for m in ("adapttoken", "lite"):
        assert got["methods"][m]["metrics"]["main"] == exp["methods"][m]["metrics"]["main"]
