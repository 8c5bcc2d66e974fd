"""The model shipped with the pack: loads offline from the repository, answers a seeded synthetic
video, and the synthetic benchmark and demo run end to end on a small setting (CPU)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import adapttoken as at
from adapttoken.training import synthetic as syn
from adapttoken.defaults import BUNDLED_MODEL

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "model.safetensors").is_file(),
                                reason="bundled model weights missing")

# A seeded demo-style video the shipped model answers (checked when the weights were trained).
SEED, FRAMES = 3, 768


@pytest.fixture(scope="module")
def bundled():
    return at.load_model(BUNDLED_MODEL, device="cpu")


def test_bundled_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                # no network at all
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-adapttoken-test")   # nothing cached either
    ad = at.load_model(BUNDLED_MODEL, device="cpu").adapter
    assert ad.family == "qwen2_5_vl"
    assert type(ad.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    cfg = ad.model.config
    assert cfg.text_config.hidden_size == 128 and cfg.text_config.num_hidden_layers == 4
    assert cfg.vision_config.tokens_per_second == 2
    assert ad.resized_size(112, 112) == (112, 112) and ad.token_grid((112, 112)) == (4, 4)
    size = sum(p.stat().st_size for p in BUNDLED_MODEL.iterdir())
    assert size < 8 * 2**20                                   # a few MB in the repository
    # the option letters are single tokens (the entropy is over them)
    p = ad.build_prompt(at.Question("What colour?", ("red", "green", "blue", "yellow")))
    assert all(len(ids) >= 1 for ids in p.option_token_ids)


def test_bundled_model_answers_a_seeded_video(bundled, tmp_path):
    from adapttoken.demo import demo_config
    sample = syn.make_sample(tmp_path / "v.mp4", FRAMES, SEED, kind="what", form="mc",
                             attribute="colour")
    q = sample.questions[0]
    cfg = demo_config(FRAMES)
    res = at.ask(bundled, sample.video_path, at.Question(q.text, q.options), config=cfg,
                 fresh_features=True)
    assert res.answer.strip()[:1] == q.answer, (res.answer, q, res.option_probs)
    # the groups that show the needle are the confident ones
    nd = sample.needles[0]
    shown = [any(nd.frame_start <= f < nd.frame_end for f in g.frame_indices) for g in res.groups]
    h_in = [g.entropy_norm for g, s in zip(res.groups, shown) if s]
    h_out = [g.entropy_norm for g, s in zip(res.groups, shown) if not s]
    assert h_in and h_out and min(h_in) < min(h_out)
    lite = at.ask(bundled, sample.video_path, at.Question(q.text, q.options), config=cfg,
                  method="lite", fresh_features=True)
    assert lite.answer.strip()[:1] == q.answer


def test_demo_runs_and_writes_the_preview(tmp_path, capsys):
    from adapttoken.demo import run_demo
    rc = run_demo(argparse.Namespace(frames=256, seed=SEED, out=str(tmp_path), model=None))
    assert rc == 0
    out = capsys.readouterr().out
    assert "correct answer:" in out and "AdaptToken-Lite:" in out and "AdaptToken:" in out
    for m in ("lite", "adapttoken"):
        assert (tmp_path / f"preview_{m}.png").stat().st_size > 1000
        json.loads((tmp_path / f"result_{m}.json").read_text())


def test_synthetic_benchmark_small(tmp_path):
    from adapttoken.bench.synthetic import main
    out = tmp_path / "bench"
    assert main(["--lengths", "256", "--count", "2", "--out", str(out), "--seed", "1",
                 "--videos", str(tmp_path / "videos")]) == 0
    md = (out / "README.md").read_text()
    assert "| 256 |" in md and "python -m adapttoken bench synthetic" in md
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == 2 * 4
    assert {r["method"] for r in res["rows"]} == {"adapttoken", "lite", "uniform", "even_split"}
    for png in ("accuracy.png", "entropy.png"):
        assert (out / png).stat().st_size > 1000


def test_training_inputs_match_inference(bundled):
    """The training script's pixel and vision path equals the processor + transformers' tower."""
    from adapttoken.training.train_tiny import check_vision
    assert check_vision(bundled.adapter.model, bundled.adapter.processor, torch.device("cpu")) < 1e-4
