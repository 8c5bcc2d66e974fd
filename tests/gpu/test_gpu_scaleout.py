"""Scale-out on one CUDA GPU (`python tests/gpu/run.py`; skipped without CUDA): the torchrun path
with one rank (NCCL) against the plain process, and a device map that puts half of the language
model on the GPU and half on the CPU (the probe and the pruned forward follow each layer)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on a GPU machine: python tests/gpu/run.py)", allow_module_level=True)

import adapttoken as at                                              # noqa: E402
from adapttoken.defaults import BUNDLED_MODEL                        # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "adapttoken" / "assets" / "sample.mp4"
QUESTION = "What coloured object appeared in the video?"
OPTIONS = ["red", "green", "blue", "yellow"]
ARGS = ["ask", str(SAMPLE), QUESTION, *sum((["--option", o] for o in OPTIONS), []),
        "--frames", "512", "--group-size", "16", "--budget", "96", "--json", "--device", "cuda"]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _same(a: dict, b: dict, tol: float) -> None:
    assert a["answer"] == b["answer"]
    assert a["kept_tokens"] == b["kept_tokens"]
    for ga, gb in zip(a["groups"], b["groups"]):
        assert abs(ga["entropy"] - gb["entropy"]) <= tol
    for k, v in a["option_probs"].items():
        assert abs(b["option_probs"][k] - v) <= tol


def test_one_rank_under_torchrun_equals_the_plain_process():
    pytest.importorskip("av")
    one = subprocess.run([sys.executable, "-m", "adapttoken", *ARGS], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    tr = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node", "1", "-m", "adapttoken", *ARGS], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
    assert tr.returncode == 0, tr.stderr[-3000:]
    a = json.loads(one.stdout)
    b = json.loads([ln for ln in tr.stdout.splitlines() if ln.startswith("{")][0])
    assert b["extra"]["distributed"]["backend"] == "nccl"
    _same(a, b, 1e-5)


def test_device_map_split_between_gpu_and_cpu_follows_each_layer():
    pytest.importorskip("av")
    pytest.importorskip("accelerate")
    cfg = at.AdaptTokenConfig(num_frames=512, group_size=16, budget=96)
    whole = at.load_model(BUNDLED_MODEL, dtype="fp32", device="cuda")
    ref = json.loads(at.ask(whole, str(SAMPLE), QUESTION, OPTIONS, config=cfg).to_json())
    n = whole.adapter.num_layers
    del whole
    dmap = {"model.visual": 0, "model.language_model.embed_tokens": 0,
            "model.language_model.rotary_emb": 0, "model.language_model.norm": "cpu",
            "lm_head": "cpu"}
    for i in range(n):
        dmap[f"model.language_model.layers.{i}"] = 0 if i < n // 2 else "cpu"
    split = at.load_model(BUNDLED_MODEL, dtype="fp32", device_map=dmap)
    layers = split.adapter.text_model.layers
    where = [str(next(layers[i].parameters()).device) for i in range(n)]
    # the first half on the GPU; accelerate keeps the "cpu" half in CPU memory and moves it in for
    # each call (its parameters show as meta), through its hooks: the probe layer is one of them
    assert where[: n // 2] == ["cuda:0"] * (n // 2) and "cuda:0" not in where[n // 2:], where
    assert split.adapter.default_layer >= n // 2
    got = json.loads(at.ask(split, str(SAMPLE), QUESTION, OPTIONS, config=cfg).to_json())
    _same(ref, got, 1e-4)
