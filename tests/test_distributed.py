"""Several processes, one question (adapttoken/distributed.py), on CPUs with gloo.

Each test starts its own ranks with torch's launcher (torchrun) and compares with one process:
group parallel (2 and 3 ranks, two families) gives the same selection and answer for every method;
Lite's stop point is the same on every rank; an error on rank 0 after the gather stops the serving
ranks; a rank killed mid-run ends the whole job with an error well before 120 s."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import adapttoken as at
from adapttoken.defaults import default_model_dir

pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "adapttoken" / "assets" / "sample.mp4"
QUESTION = "What coloured object appeared in the video?"
OPTIONS = ["red", "green", "blue", "yellow"]
BASE = {"question": QUESTION, "options": OPTIONS, "frames": 256, "group_size": 8, "budget": 64,
        "max_new_tokens": 8}
TIMEOUT = 170


def _env() -> dict:
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path),
               TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _torchrun(n: int, *args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(n), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _worker(tmp_path: Path, n: int, **spec) -> dict:
    """Run tests/dist_worker.py on n ranks; {"rank0": ..., "adapttoken": Result dict, ...}."""
    out = tmp_path / f"out{n}"
    out.mkdir()
    full = {**BASE, "model": str(default_model_dir()), "video": str(SAMPLE), "out": str(out), **spec}
    (out / "spec.json").write_text(json.dumps(full))
    p = _torchrun(n, str(ROOT / "tests" / "dist_worker.py"), str(out / "spec.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = {f.stem: json.loads(f.read_text()) for f in out.glob("*.json") if f.stem != "spec"}
    return got


def _reference(model_dir, video, methods, **over) -> dict:
    """The same questions in this one process, under the same stop rule: Lite's answer check does
    not run under torchrun (docs/DISTRIBUTED.md), so the reference runs the group rule alone."""
    torch.set_num_threads(1)
    model = at.load_model(model_dir, dtype="fp32", device="cpu")
    spec = {**BASE, **over}
    cfg = at.AdaptTokenConfig(num_frames=spec["frames"], group_size=spec["group_size"],
                              budget=spec["budget"], max_new_tokens=spec["max_new_tokens"],
                              max_pixels=spec.get("max_pixels", 308 * 560), decode_workers=0,
                              stop_threshold=spec.get("stop_threshold", 0.2),
                              stop_confirm=spec.get("stop_confirm", 2), stop_check_answer=False)
    out = {}
    for m in methods:
        model.clear_cache()
        out[m] = json.loads(at.ask(model, str(video), spec["question"], spec["options"],
                                   config=cfg, method=m).to_json())
    return out


def _same_selection(ref: dict, got: dict, tol: float = 1e-5) -> None:
    assert got["answer"] == ref["answer"]
    assert got["kept_tokens"] == ref["kept_tokens"]
    assert got["skipped_groups"] == ref["skipped_groups"]
    assert got["group_passes"] == ref["group_passes"]
    assert len(got["groups"]) == len(ref["groups"])
    for a, b in zip(ref["groups"], got["groups"]):
        assert (a["group"], a["budget"], a["kept"], a["frame_indices"]) == \
               (b["group"], b["budget"], b["kept"], b["frame_indices"])
        if a["entropy"] is None:
            assert b["entropy"] is None
        else:
            assert abs(a["entropy"] - b["entropy"]) <= tol
    if ref["option_probs"]:
        for k, v in ref["option_probs"].items():
            assert abs(got["option_probs"][k] - v) <= tol


def test_cli_ask_under_torchrun_equals_one_process(tmp_path):
    args = ["ask", str(SAMPLE), QUESTION, *sum((["--option", o] for o in OPTIONS), []),
            "--frames", "256", "--group-size", "8", "--budget", "64", "--json", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "adapttoken", *args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, "-m", "adapttoken", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [ln for ln in two.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1                                   # rank 0 alone prints
    a, b = json.loads(one.stdout), json.loads(lines[0])
    _same_selection(a, b)
    d = b["extra"]["distributed"]
    assert (d["world"], d["replicas"], d["tp"]) == (2, 2, 1)
    # the work was divided: each replica ran half of the 16 group passes, and rows crossed over
    assert [r["group_passes"] for r in d["ranks"]] == [8, 8]
    assert d["rows_exchanged"] > 0 and b["encoded_slices"] == a["encoded_slices"]


def test_group_parallel_every_method_equals_one_process(tmp_path):
    methods = ["adapttoken", "lite", "even_split", "uniform"]
    got = _worker(tmp_path, 2, methods=methods)
    ref = _reference(default_model_dir(), SAMPLE, methods)
    for m in methods:
        _same_selection(ref[m], got[m])
    assert got["rank1"] == {m: {"result": False} for m in methods}   # replica 1 returns nothing
    assert got["rank0"] == {m: {"result": True} for m in methods}


@pytest.mark.parametrize("threshold, confirm", [(0.2, 1), (1.0, 2)])
def test_lite_rounds_of_three_stop_where_one_process_stops(tmp_path, threshold, confirm):
    # (1.0, 2): every group is confident, so the stop is where a second group agrees on the
    # answer: the favoured answer (GroupScore.top) must travel between the processes
    stop = {"stop_threshold": threshold, "stop_confirm": confirm}
    got = _worker(tmp_path, 3, methods=["lite", "lite_rounds"], **stop)
    ref = _reference(default_model_dir(), SAMPLE, ["lite"], **stop)["lite"]
    _same_selection(ref, got["lite"])
    views = [got[f"rank{r}"]["lite_rounds"] for r in range(3)]
    assert all(v["processed"] == views[0]["processed"] for v in views)   # one stop point for all
    assert all(v["skipped"] == views[0]["skipped"] for v in views)
    assert views[0]["skipped"] == ref["skipped_groups"] and ref["skipped_groups"]
    done = len(views[0]["processed"])
    run = sum(v["passes_run"] for v in views)
    # rounds of 3: the last round ran whole, the passes after the stop point were dropped
    assert run == -(-done // 3) * 3 and views[0]["passes_dropped"] == run - done


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    from adapttoken.training.tiny import save_model_folder
    from adapttoken.training.tiny_families import build_tiny_family
    model, proc = build_tiny_family("qwen3_vl", seed=0, layers=4)
    return save_model_folder(tmp_path_factory.mktemp("m") / "tiny-qwen3vl", model, proc)


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    from videos import write_video
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 96, width=64, height=48, fps=8)


def test_group_parallel_qwen3_vl_equals_one_process(tmp_path, qwen3_folder, small_clip):
    over = {"frames": 64, "group_size": 4, "budget": 24, "max_pixels": 64 * 64}
    got = _worker(tmp_path, 2, methods=["adapttoken", "lite"], model=str(qwen3_folder),
                  video=str(small_clip), **over)
    ref = _reference(qwen3_folder, small_clip, ["adapttoken", "lite"], **over)
    for m in ("adapttoken", "lite"):
        _same_selection(ref[m], got[m])


def test_an_error_on_rank_0_after_the_gather_stops_the_serving_ranks(tmp_path):
    t0 = time.monotonic()
    got = _worker(tmp_path, 2, methods=["abort_after_select"])
    assert time.monotonic() - t0 < 120
    assert got["rank0"]["abort_after_select"]["error"] == "RuntimeError"
    seen = got["rank1"]["abort_after_select"]
    assert seen["error"] == "RemoteError" and "rank 0 failed" in seen["message"]


def _probe_reference(model_dir, video, **over) -> dict:
    """What tests/dist_worker.py's "probe" records, computed in this one process."""
    from adapttoken.entropy import score_groups
    from adapttoken.groups import split_groups
    from adapttoken.pipeline import prepare
    from adapttoken.question import Question
    from adapttoken.rank import RankedGroups
    torch.set_num_threads(1)
    spec = {**BASE, **over}
    model = at.load_model(model_dir, dtype="fp32", device="cpu")
    cfg = at.AdaptTokenConfig(num_frames=spec["frames"], group_size=spec["group_size"],
                              budget=spec["budget"], max_pixels=spec.get("max_pixels", 308 * 560),
                              decode_workers=0)
    v = prepare(model, str(video), cfg)
    groups = split_groups(v, cfg.group_size)
    q = Question(spec["question"], tuple(spec["options"]))
    out = {}
    for agg in ("max", "mean"):
        scored = score_groups(RankedGroups(model, groups, q, aggregation=agg))
        out[agg] = [{"entropy": s.entropy, "gids": s.pass_.gids.tolist(),
                     "scores": s.pass_.scores.float().tolist()}
                    for s in (scored.score(g) for g in range(min(3, len(groups))))]
    attn = model.adapter.text_model.layers[0].self_attn
    return {"groups": out, "q_rows": int(attn.q_proj.weight.shape[0]),
            "mlp_rows": int(model.adapter.text_model.layers[0].mlp.up_proj.weight.shape[0])}


def _same_probe(ref: dict, got: dict, rtol: float = 1e-4) -> None:
    for agg in ("max", "mean"):
        for a, b in zip(ref["groups"][agg], got["groups"][agg], strict=True):
            assert a["gids"] == b["gids"]
            assert abs(a["entropy"] - b["entropy"]) <= 1e-5
            torch.testing.assert_close(torch.tensor(b["scores"]), torch.tensor(a["scores"]),
                                       rtol=rtol, atol=1e-7)


def _tensor_parallel_case(tmp_path, model_dir, video, **over):
    methods = ["adapttoken", "lite", "probe"]
    got = _worker(tmp_path, 2, methods=methods, tp=2, model=str(model_dir), video=str(video), **over)
    ref = _reference(model_dir, video, ["adapttoken", "lite"], **over)
    for m in ("adapttoken", "lite"):
        _same_selection(ref[m], got[m], tol=1e-4)
        d = got[m]["extra"]["distributed"]
        assert (d["world"], d["replicas"], d["tp"]) == (2, 1, 2)
    # both ranks of the one copy return the Result (the answer's forward ran on both)
    assert got["rank1"]["adapttoken"] == {"result": True}
    one = _probe_reference(model_dir, video, **over)
    for r in (0, 1):
        mine = got[f"rank{r}"]["probe"]
        # each rank holds half of the heads and of the MLP (transformers' tp_plan), and the probe
        # scores combined over the ranks equal one process's over all heads
        assert mine["q_rows"] * 2 == one["q_rows"] and mine["mlp_rows"] * 2 == one["mlp_rows"]
        _same_probe(one, mine)
    assert got["rank0"]["probe"]["groups"] == got["rank1"]["probe"]["groups"]  # one decision


def test_tensor_parallel_two_ranks_equals_one_process(tmp_path):
    _tensor_parallel_case(tmp_path, default_model_dir(), SAMPLE, frames=96)


@pytest.fixture(scope="module")
def internvl_folder(tmp_path_factory):
    from adapttoken.training.tiny import save_model_folder
    from adapttoken.training.tiny_families import build_tiny_family
    model, proc = build_tiny_family("internvl", seed=0, layers=4)
    return save_model_folder(tmp_path_factory.mktemp("m") / "tiny-internvl", model, proc)


# (transformers' tensor-parallel plan for Qwen3-VL's text model covers only its embeddings, so
# InternVL, whose Qwen2 language model is split layer by layer, is the second family here)
def test_tensor_parallel_internvl_equals_one_process(tmp_path, internvl_folder, small_clip):
    _tensor_parallel_case(tmp_path, internvl_folder, small_clip, frames=32, group_size=4,
                          budget=24, max_pixels=64 * 64)


def test_bench_gpu_tp_builds_the_random_model_sharded(tmp_path):
    p = subprocess.run([sys.executable, "-m", "adapttoken", "bench", "gpu", "--tiny", "--tp", "2",
                        "--device", "cpu", "--frames", "32", "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (res["meta"]["nproc"], res["meta"]["tp"]) == (2, 2)
    par = res["meta"]["params"]
    # rank 0 holds about half of the language model (the vision tower is whole on every rank)
    assert par["bytes_this_rank"] < par["bytes"] - 0.4 * 4 * (par["decoder_linear"])
    assert {c["method"] for c in res["cases"]} >= {"adapttoken", "lite", "uniform"}


def test_several_tensor_parallel_copies_are_refused_with_a_clear_error(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    spec = {**BASE, "model": str(default_model_dir()), "video": str(SAMPLE), "out": str(out),
            "methods": ["adapttoken"], "tp": 2}
    (out / "spec.json").write_text(json.dumps(spec))
    p = _torchrun(4, str(ROOT / "tests" / "dist_worker.py"), str(out / "spec.json"))
    assert p.returncode != 0 and "--tp 2 with 4 processes would make 2 tensor-parallel" in p.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_every_rank_with_an_error(tmp_path):
    args = ["ask", str(SAMPLE), QUESTION, *sum((["--option", o] for o in OPTIONS), []),
            "--frames", "960", "--group-size", "2", "--budget", "64", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "adapttoken", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        victim = None
        t0 = time.monotonic()
        while victim is None and time.monotonic() - t0 < 60:
            for pid in _children(p.pid):
                if _rank_of(pid) == 1:
                    victim = pid
            time.sleep(0.2)
        assert victim is not None, "rank 1 never started"
        time.sleep(6.0)                     # loaded and into the group passes (the run takes ~15 s)
        assert p.poll() is None, "the job ended before the kill: make it longer"
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = p.communicate(timeout=150)
        ended = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert ended < 120, f"the job took {ended:.0f} s to end after a rank died"
    assert "rank" in err and ("SIGKILL" in err or "Signal 9" in err or "exitcode" in err)
