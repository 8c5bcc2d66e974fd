"""The whole method on a real video file with a tiny random Qwen2.5-VL: AdaptToken, Lite, baselines."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import adapttoken as at
from adapttoken.errors import InputError, ModelLoadError, VideoError

from videos import frame_number, write_video


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    # 96 frames at 8 fps, 64x48 (frame number drawn in): 48 slices of 2x2 tokens at 56x56
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 96, width=64, height=48, fps=8)


def _config(**kw):
    base = dict(num_frames=64, group_size=4, budget=24, max_pixels=56 * 56, min_pixels=56 * 56)
    base.update(kw)
    return at.AdaptTokenConfig(**base)


Q = at.Question("What is shown?", ("a dog", "a cat", "a car", "a man"))


def test_adapttoken_end_to_end(tiny_model, video_file):
    res = at.ask(tiny_model, video_file, Q, config=_config(), fresh_features=True)
    assert res.method == "adapttoken"
    assert res.num_frames == 64 and res.num_slices == 32 and res.tokens_per_slice == 4
    assert len(res.groups) == 8 and res.group_passes == 8 and res.skipped_groups == []
    assert sum(g.budget for g in res.groups) == 24
    assert len(res.kept_tokens) == sum(g.kept for g in res.groups) <= 24
    assert set(res.option_probs) == set("ABCD")
    assert abs(sum(res.option_probs.values()) - 1) < 1e-4
    # every sampled frame decoded once, every slice encoded once
    assert res.decoded_frames == 64 and res.encoded_slices == 32
    # kept tokens are in temporal order and report the real frames
    times = [k["timestamp"] for k in res.kept_tokens]
    assert times == sorted(times)
    for k in res.kept_tokens:
        assert 0 <= k["row"] < 2 and 0 <= k["col"] < 2
        assert abs(k["timestamp"] - k["frame_index"] / 8) < 1e-6
    # strided groups: group g holds slices g, g+8, ...
    plan = at.open_video(video_file, 64).plan
    want = [plan.indices[p] for s in (1, 9, 17, 25) for p in (2 * s, 2 * s + 1)]
    assert res.groups[1].frame_indices == want
    assert {"decode", "vision", "group_pass", "allocate", "answer", "total"} <= set(res.seconds)
    json.loads(res.to_json())


def test_lite_runs_exactly_the_groups_up_to_the_stop(tiny_model, video_file):
    cfg = _config()
    full = at.ask(tiny_model, video_file, Q, config=cfg, fresh_features=True)
    hn = [g.entropy_norm for g in full.groups]
    k = int(np.argmin(hn))
    assert sum(h == hn[k] for h in hn) == 1
    cfg.stop_threshold = hn[k] + 1e-6          # the first group under the threshold is group k
    cfg.stop_confirm = 1                       # the paper's rule: stop at the first confident group
    cfg.stop_check_answer = False              # on the group rule alone (the check: test below)
    # count the language-model passes for real: a hook on the decoder's forward
    calls = []
    h = tiny_model.adapter.text_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        lite = at.ask(tiny_model, video_file, Q, config=cfg, method="lite", fresh_features=True)
    finally:
        h.remove()
    assert lite.group_passes == k + 1
    assert lite.skipped_groups == list(range(k + 1, 8))
    # a cold group pass is two calls (the prefix, then the question suffix: models/qwen2_5_vl.py);
    # the rest are the answer's prefill + decode steps
    gen_calls = len(calls) - 2 * (k + 1)
    assert 1 <= gen_calls <= cfg.max_new_tokens
    # skipped groups: no frame decoded, no slice encoded
    feats = tiny_model.features_for(at.open_video(video_file, 64, max_pixels=56 * 56,
                                                  min_pixels=56 * 56))
    assert lite.decoded_frames == 2 * 4 * (k + 1) and lite.encoded_slices == 4 * (k + 1)
    computed = set(np.nonzero(feats._have.numpy())[0].tolist())
    processed = set(np.concatenate([np.arange(g, 32, 8) for g in range(k + 1)]).tolist())
    assert computed == processed
    # same entropies as the full run for the groups it did process
    for a, b in zip(lite.groups[: k + 1], full.groups[: k + 1]):
        assert a.entropy == pytest.approx(b.entropy, abs=1e-5)
    assert all(lite.groups[g].entropy is None for g in lite.skipped_groups)


def test_lite_with_confirm_stops_where_a_second_confident_group_agrees(tiny_model, video_file):
    cfg = _config()
    full = at.ask(tiny_model, video_file, Q, config=cfg, fresh_features=True)
    assert all(g.entropy_norm < 1.0 for g in full.groups)
    tops = [int(np.argmax(g.option_probs)) for g in full.groups]
    assert [g.top for g in full.groups] == tops                 # reported with each group
    cfg.stop_threshold = 1.0                    # every group is confident: only agreement decides
    cfg.stop_check_answer = False
    want = next((g for g in range(1, len(tops)) if tops[g] in tops[:g]), len(tops) - 1)
    for confirm, stop_at in ((1, 0), (2, want)):
        cfg.stop_confirm = confirm
        lite = at.ask(tiny_model, video_file, Q, config=cfg, method="lite")
        assert lite.group_passes == stop_at + 1, (confirm, tops)
        assert lite.skipped_groups == list(range(stop_at + 1, len(tops)))


def test_lite_answer_check_stops_where_the_answer_so_far_agrees(tiny_model, video_file):
    """StopRule.check_answer: with every group confident and confirm=1, Lite stops at the first
    group whose favoured answer the answer pass over the tokens chosen so far shares. Each check is
    recomputed here: the selection those groups give (allocate without a stop rule over the same
    groups) answered by the answer pass, whose most likely option must be the check's. The
    question is one where the random model's first check disagrees (its answer over group 0's
    tokens is not group 0's favourite), so Lite reads on past the paper's stop point."""
    from adapttoken.pipeline import prepare
    Q = at.Question("Where?", ("left", "right", "up", "down"))
    cfg = _config(stop_threshold=1.0, stop_confirm=1)
    video = prepare(tiny_model, video_file, cfg, fresh_features=True)
    full = at.score_groups(at.RankedGroups(tiny_model, at.split_groups(video, 4), Q))
    ref = at.allocate(full, 24)
    tops = [g.top for g in ref.groups]
    lite = at.early_stop(at.score_groups(at.RankedGroups(tiny_model, at.split_groups(video, 4), Q)),
                         1.0, 1, 1)
    sel = at.allocate(lite, 24)
    checks = lite.answer_checks
    stop = len(sel.groups) - len(sel.skipped_groups) - 1
    assert [c["group"] for c in checks] == list(range(len(checks)))   # every group is a would-be stop
    assert [c["group_top"] for c in checks] == tops[:len(checks)]
    agreed = [c["answer_top"] == c["group_top"] for c in checks]
    assert len(checks) >= 2 and not any(agreed[:-1]) and agreed[-1]
    assert stop == checks[-1]["group"] and sel.method == "lite"
    for c in checks:                           # the check's answer, recomputed
        upto = at.ScoredGroups(full.ranked)
        done, _ = full.evaluate()
        upto.adopt(done[:c["group"] + 1], list(range(c["group"] + 1, len(tops))))
        part = at.allocate(upto, 24)
        res = at.answer(part, max_new_tokens=1)
        assert int(np.argmax([res.option_probs[L] for L in "ABCD"])) == c["answer_top"], c
    # the pipeline's flag turns the check off: the paper's first confident group
    off = at.ask(tiny_model, video_file, Q, config=_config(stop_threshold=1.0, stop_confirm=1,
                                                           stop_check_answer=False), method="lite")
    assert off.group_passes == 1


def test_second_question_reuses_vision_features(tiny_model, video_file):
    cfg = _config()
    at.ask(tiny_model, video_file, Q, config=cfg, fresh_features=True)
    res2 = at.ask(tiny_model, video_file, at.Question("Which one?", ("x", "y")), config=cfg)
    assert res2.decoded_frames == 0 and res2.encoded_slices == 0


def test_baselines_same_budget(tiny_model, video_file):
    cfg = _config(budget=40)
    uni = at.ask(tiny_model, video_file, Q, config=cfg, method="uniform", fresh_features=True)
    assert uni.method == "uniform" and len(uni.kept_tokens) == 40 and uni.group_passes == 0
    assert uni.decoded_frames == 20                # 10 slices of 4 tokens, nothing else decoded
    slices = sorted({k["slice"] for k in uni.kept_tokens})
    assert slices[0] == 0 and slices[-1] == 31 and len(slices) == 10
    even = at.ask(tiny_model, video_file, Q, config=cfg, method="even_split")
    assert [g.budget for g in even.groups] == [5] * 8 and even.redundant_dropped == 0


def test_open_question_entropy_modes(tiny_model, video_file):
    cfg = _config(entropy_mode="greedy_mean", entropy_tokens=3)
    res = at.ask(tiny_model, video_file, "Describe the video.", config=cfg, fresh_features=True)
    assert res.option_probs is None
    vocab = tiny_model.adapter.model.config.text_config.vocab_size
    for g in res.groups:
        assert 0 <= g.entropy <= np.log(vocab) + 1e-4
    with pytest.raises(InputError, match="multiple-choice"):
        at.ask(tiny_model, video_file, "Describe.", config=_config(entropy_mode="options"))


def test_split_clamps_group_size():
    from adapttoken.groups import split_slices
    for layout in ("strided", "contiguous"):
        (only,) = split_slices(5, 64, layout)
        assert only.tolist() == [0, 1, 2, 3, 4]
        assert [g.tolist() for g in split_slices(5, 5, layout)] == [[0, 1, 2, 3, 4]]
    with pytest.raises(InputError, match="group_size=0"):
        split_slices(5, 0)


def test_group_size_above_the_slices_is_one_group(tiny_model, video_file, caplog):
    """A group_size larger than the video's 32 slices is clamped, not refused: one group pass over
    every slice, the effective and the asked size in the result and in the log."""
    with caplog.at_level("INFO"):
        res = at.ask(tiny_model, video_file, Q, config=_config(group_size=33))
    assert res.group_size == 32 and res.requested_group_size == 33
    assert len(res.groups) == 1 and res.group_passes == 1 and len(res.groups[0].frame_indices) == 64
    assert "group_size=33 clamped to the video's 32 slices" in caplog.text
    d = json.loads(res.to_json())
    assert (d["group_size"], d["requested_group_size"]) == (32, 33)
    same = at.ask(tiny_model, video_file, Q, config=_config(group_size=32))
    assert same.answer == res.answer and same.option_probs == res.option_probs
    assert same.group_size == same.requested_group_size == 32


def test_frames_read_are_the_planned_ones(tiny_model, video_file):
    v = at.open_video(video_file, num_frames=16)
    f = v.read(np.arange(16))
    assert [frame_number(x.numpy()) for x in f] == list(v.plan.indices)


# -- bad input: each a clear error naming the input --------------------------------------------

def test_bad_inputs(tiny_model, video_file, tmp_path):
    with pytest.raises(InputError, match="question"):
        at.ask(tiny_model, video_file, "   ", config=_config())
    with pytest.raises(InputError, match="budget"):
        at.ask(tiny_model, video_file, Q, config=_config(budget=0))
    with pytest.raises(InputError, match="group_size"):
        at.ask(tiny_model, video_file, Q, config=_config(group_size=0))
    one = at.ask(tiny_model, video_file, Q, config=_config(num_frames=1))   # one 2-frame slice
    assert one.num_slices == 1 and one.group_size == 1 and one.group_passes == 1
    with pytest.raises(VideoError, match="nope.mp4"):
        at.ask(tiny_model, tmp_path / "nope.mp4", Q, config=_config())
    txt = tmp_path / "notes.mp4"
    txt.write_text("this is not a video")
    with pytest.raises(VideoError, match="notes.mp4"):
        at.ask(tiny_model, txt, Q, config=_config())
    with pytest.raises(InputError, match="layer"):
        at.RankedGroups(tiny_model, at.split_groups(at.open_video(video_file, 16), 2), Q, layer=99)


def test_model_folder_errors(tmp_path, tiny_folder):
    with pytest.raises(ModelLoadError, match="does not exist"):
        at.load_model(tmp_path / "missing")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="llama.*supported families: internvl, llava_onevision, qwen2_5_vl, qwen3_vl"):
        at.load_model(other)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_folder / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        at.load_model(pickled)
    m = at.load_model(tiny_folder, device="cpu")
    assert m.adapter.family == "qwen2_5_vl" and m.adapter.num_layers == 4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adapttoken", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_json_and_errors(tiny_folder, video_file, tmp_path):
    r = _cli("ask", video_file, "What is shown?", "--option", "a dog", "--option", "a cat",
             "--model", tiny_folder, "--frames", 32, "--budget", 16, "--group-size", 4,
             "--max-pixels", 56 * 56, "--lite", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("answer", "groups", "skipped_groups", "seconds"):
        assert key in out
    for g in out["groups"]:
        assert {"entropy", "relevance", "budget", "kept"} <= set(g)
    assert "total" in out["seconds"] and out["method"] == "lite"
    r = _cli("ask", tmp_path / "missing.mp4", "Q?", "--model", tiny_folder)
    assert r.returncode != 0 and "missing.mp4" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("ask", video_file, "Q?", "--model", tmp_path / "nomodel")
    assert r.returncode != 0 and "nomodel" in r.stderr and "Traceback" not in r.stderr
    r = _cli("ask", video_file, "Q?", "--model", tiny_folder, "--budget", 0)
    assert r.returncode != 0 and "budget" in r.stderr
