"""accelerate's device_map through load_model (one process): on this CPU machine "auto" keeps every
layer on the CPU, and the question's result equals the plain load; the offloaded-layer case runs on
a GPU (tests/gpu/test_gpu_scaleout.py). Bad values get a clear error."""
from __future__ import annotations

import json

import pytest

import adapttoken as at
from adapttoken.defaults import BUNDLED_MODEL
from adapttoken.errors import InputError

pytest.importorskip("av")
pytest.importorskip("accelerate")


def test_device_map_auto_answers_as_the_plain_load(tmp_path):
    from adapttoken.training import synthetic as syn
    path = tmp_path / "needle.mp4"
    s = syn.make_sample(path, 96, seed=5, kind="what", form="mc", attribute="colour")
    q = at.Question(s.questions[0].text, tuple(s.questions[0].options))
    cfg = at.AdaptTokenConfig(num_frames=96, group_size=8, budget=48, decode_workers=0)
    one = json.loads(at.ask(at.load_model(BUNDLED_MODEL, device="cpu"), str(path), q, config=cfg).to_json())
    model = at.load_model(BUNDLED_MODEL, device="cpu", device_map="auto")
    got = json.loads(at.ask(model, str(path), q, config=cfg).to_json())
    assert got["answer"] == one["answer"] and got["kept_tokens"] == one["kept_tokens"]
    assert [g["entropy"] for g in got["groups"]] == pytest.approx([g["entropy"] for g in one["groups"]])


def test_bad_placements_are_refused_with_a_clear_error():
    with pytest.raises(InputError, match="device_map='everywhere'"):
        at.load_model(BUNDLED_MODEL, device="cpu", device_map="everywhere")


def test_tp_outside_torchrun_names_the_command(capsys):
    from adapttoken.cli import main
    sample = BUNDLED_MODEL.parent / "sample.mp4"
    rc = main(["ask", str(sample), "What colour?", "--tp", "2", "--frames", "16"])
    assert rc != 0
    assert "torchrun --nproc-per-node 2 -m adapttoken ask" in capsys.readouterr().err
