"""Speed features of SliceFeatures give the same features: decoder lanes and overlap, CPU storage,
lookahead for Lite, the on-disk cache (hit, and misses on a changed file / plan / model), errors and
cancellation from the decoder threads; plus a CPU smoke test of `bench gpu --tiny`."""
from __future__ import annotations

import dataclasses
import json
import os
import threading

import numpy as np
import pytest
import torch

import adapttoken as at
from adapttoken.errors import Cancelled
from adapttoken.features import SliceFeatures
from adapttoken.question import Hooks

from videos import write_video

PX = dict(max_pixels=56 * 56, min_pixels=56 * 56)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 120 frames, GOP 10: parts of the decoder lanes seek as well as read on
    return write_video(tmp_path_factory.mktemp("perf") / "clip.mp4", 120, width=64, height=48,
                       fps=8, gop=10)


def _video(path, n=96):
    return at.open_video(path, num_frames=n, **PX)


def _reference(adapter, video):
    """Every slice encoded in one call, frames read in the calling thread."""
    frames = video.read(np.arange(video.num_frames))
    f = SliceFeatures(adapter, video)
    return adapter.encode(frames, f.resized)


def _all(feats):
    emb, _, _ = feats.tokens_of_slices(np.arange(feats.num_slices))
    return emb.view(feats.num_slices, feats.tokens_per_slice, -1)


@pytest.mark.parametrize("workers,overlap,chunk", [(0, False, 32), (1, True, 7), (3, True, 4),
                                                   (3, False, 5)])
def test_lanes_overlap_and_chunking_give_the_same_features(tiny_adapter, clip, workers, overlap, chunk):
    video = _video(clip)
    ref = _reference(tiny_adapter, video)
    f = SliceFeatures(tiny_adapter, _video(clip), chunk_slices=chunk, decode_workers=workers,
                      overlap=overlap)
    f.prefetch()
    torch.testing.assert_close(_all(f), ref, rtol=1e-5, atol=1e-5)
    assert f.decoded_frames == video.num_frames and f.encoded_slices == video.num_slices
    # gathers of single tokens across storage blocks equal the slice gathers
    gids = torch.tensor([0, 5, 4 * 17 + 3, 4 * (video.num_slices - 1) + 2, 1])
    emb, coords = f.tokens(gids)
    torch.testing.assert_close(emb, ref.reshape(-1, ref.shape[-1])[gids], rtol=1e-5, atol=1e-5)
    assert coords.shape == (3, 5)
    f.release()


def test_strided_requests_and_cpu_storage(tiny_adapter, clip):
    video = _video(clip)
    ref = _reference(tiny_adapter, video)
    f = SliceFeatures(tiny_adapter, _video(clip), chunk_slices=4, decode_workers=2,
                      feature_device="cpu")
    groups = at.split_groups(f.video, 8, "strided")
    for g in (3, 0):                                     # out of order, like a consumer might
        emb, coords, gids = f.tokens_of_slices(groups.slices[g])
        want = ref[torch.as_tensor(np.sort(groups.slices[g]))].reshape(-1, ref.shape[-1])
        torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-5)
    assert f.storage_device == torch.device("cpu")
    assert f.encoded_slices == 2 * len(groups.slices[0])
    # rows across storage blocks, in any order; `columns` gathers the first columns only
    gids = torch.tensor([5, f.tokens_per_slice * 9 + 1, 0, f.tokens_per_slice * 17 + 3])
    full, _ = f.tokens(gids)
    part, _ = f.tokens(gids, columns=7)
    assert part.shape == (4, 7) and torch.equal(part, full[:, :7])
    f.release()


def test_auto_storage_stays_on_the_model_device_on_cpu(tiny_adapter, clip):
    f = SliceFeatures(tiny_adapter, _video(clip), gpu_feature_bytes=1)
    f.ensure([0, 1])
    assert f.storage_device == tiny_adapter.device


def test_auto_gpu_feature_limit_is_a_share_of_the_card(tiny_adapter, clip, monkeypatch):
    """"auto" keeps features on a CUDA device up to 20% of its memory budget (no fixed 4 GiB cap);
    an explicit gpu_feature_bytes still caps it; no known budget falls back to 4 GiB. The budget of
    a CUDA device is stood in for (this machine has none); the rule is plain arithmetic on it."""
    from adapttoken import features as feats_mod
    from adapttoken import memory
    gib = 2 ** 30
    cuda = torch.device("cuda", 0)
    f = SliceFeatures(tiny_adapter, _video(clip))
    monkeypatch.setattr(feats_mod, "device_memory_budget", lambda dev: 140 * gib)
    assert f.gpu_feature_limit(cuda) == int(0.2 * 140 * gib)         # an H200: 28 GiB
    monkeypatch.setattr(feats_mod, "device_memory_budget", lambda dev: 24 * gib)
    assert f.gpu_feature_limit(cuda) == int(0.2 * 24 * gib)          # a 24 GiB card: 4.8 GiB
    f.configure(gpu_feature_bytes=gib)
    assert f.gpu_feature_limit(cuda) == gib
    monkeypatch.setattr(feats_mod, "device_memory_budget", lambda dev: None)
    assert f.gpu_feature_limit(cuda) == gib
    g = SliceFeatures(tiny_adapter, _video(clip))
    assert g.gpu_feature_limit(cuda) == 4 * gib
    # the memory estimate follows the same rule
    monkeypatch.setattr(feats_mod, "device_memory_budget", lambda dev: 140 * gib)
    assert memory.stored_features_bytes(g, cuda) > 0
    monkeypatch.setattr(feats_mod, "device_memory_budget", lambda dev: 1)
    assert memory.stored_features_bytes(g, cuda) == 0
    f.release()
    g.release()


def test_decoder_error_reaches_the_caller_and_threads_stop(tiny_adapter, clip, monkeypatch):
    f = SliceFeatures(tiny_adapter, _video(clip), chunk_slices=4, decode_workers=2)
    calls = []

    def boom(self, j, out, start, positions, cancel):
        calls.append(threading.current_thread().name)
        raise RuntimeError("decoder exploded")

    from adapttoken.decode import FrameDecoder
    monkeypatch.setattr(FrameDecoder, "_read_part", boom)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        f.prefetch()
    assert calls and all(n.startswith("adapttoken-decode") for n in calls)
    assert not f._have.any()
    f.release()


def test_cancel_between_chunks(tiny_adapter, clip):
    f = SliceFeatures(tiny_adapter, _video(clip), chunk_slices=4, decode_workers=2)
    n = {"checks": 0}

    def cancelled():
        n["checks"] += 1
        return n["checks"] > 2

    with pytest.raises(Cancelled):
        f.prefetch(Hooks(cancelled=cancelled))
    assert 0 < int(f._have.sum()) < f.num_slices
    # the pipeline still works afterwards (no stuck lane, no half-written chunk)
    f.prefetch()
    assert bool(f._have.all())
    f.release()


def test_lite_lookahead_does_not_count_or_encode_skipped_groups(tiny_model, clip):
    # the frame stash off: this checks the lookahead alone (test_frame_stash.py checks both)
    cfg = at.AdaptTokenConfig(num_frames=96, group_size=6, budget=24, decode_workers=2,
                              frame_stash_bytes=0, **PX)
    full = at.ask(tiny_model, clip, "What is shown?", options=("a", "b"), config=cfg,
                  fresh_features=True)
    hn = [g.entropy_norm for g in full.groups]
    k = int(np.argmin(hn))
    cfg.stop_threshold, cfg.stop_confirm = hn[k] + 1e-6, 1     # stop at the first group under it
    lite = at.ask(tiny_model, clip, "What is shown?", options=("a", "b"), config=cfg, method="lite",
                  fresh_features=True)
    n_groups = len(full.groups)
    assert lite.group_passes == k + 1
    assert lite.encoded_slices == sum(len(s) for s in
                                      at.split_groups(at.open_video(clip, 96, **PX), 6).slices[:k + 1])
    assert lite.decoded_frames == 2 * lite.encoded_slices
    st = lite.extra["features"]
    per_group = 2 * 6                                     # frames of one group (6 slices)
    if k + 1 < n_groups:                                  # the group after the stop, decoded ahead
        assert 0 < st["lookahead_wasted_frames"] <= per_group
    else:
        assert st["lookahead_wasted_frames"] == 0
    # every processed group's frames were decoded ahead and used (none decoded twice)
    assert st["lookahead_frames"] - st["lookahead_wasted_frames"] == lite.decoded_frames


# -- on-disk cache ------------------------------------------------------------------------------

def _fresh(adapter, path, cache, n=96, **kw):
    return SliceFeatures(adapter, at.open_video(path, num_frames=n, **PX), chunk_slices=8,
                         cache_dir=cache, **kw)


def test_disk_cache_hit_equals_fresh_features(tiny_adapter, clip, tmp_path):
    cache = tmp_path / "cache"
    a = _fresh(tiny_adapter, clip, cache, decode_workers=2)
    a.prefetch()
    ref = _all(a)
    a.release()
    files = list(cache.rglob("*.safetensors"))
    assert files and not list(cache.rglob("*.tmp"))
    b = _fresh(tiny_adapter, clip, cache)                 # a new object: as a second process would
    got = _all(b)
    assert b.decoded_frames == 0 and b.encoded_slices == 0
    assert b.stats["cache_loaded_slices"] == b.num_slices
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    b.release()


def test_disk_cache_partial_then_rest(tiny_adapter, clip, tmp_path):
    cache = tmp_path / "cache"
    a = _fresh(tiny_adapter, clip, cache)
    a.ensure([0, 5, 9])
    b = _fresh(tiny_adapter, clip, cache)
    b.prefetch()
    assert b.stats["cache_loaded_slices"] == 3 and b.encoded_slices == b.num_slices - 3
    ref = _reference(tiny_adapter, _video(clip))
    torch.testing.assert_close(_all(b), ref, rtol=1e-5, atol=1e-5)


def test_disk_cache_misses_on_changed_file_plan_or_model(tiny_adapter, tiny, clip, tmp_path):
    cache = tmp_path / "cache"
    path = tmp_path / "v.mp4"
    path.write_bytes(open(clip, "rb").read())
    a = _fresh(tiny_adapter, path, cache)
    a.prefetch()
    key = a.disk_cache.key
    # same bytes under another name and a new mtime: still a hit
    other = tmp_path / "copy.mp4"
    other.write_bytes(path.read_bytes())
    assert _fresh(tiny_adapter, other, cache).disk_cache.key == key
    # another sampling
    c = _fresh(tiny_adapter, path, cache, n=64)
    assert c.disk_cache.key != key
    c.ensure([0])
    assert c.stats["cache_loaded_slices"] == 0 and c.encoded_slices == 1
    # another model (same config, other weights)
    from adapttoken.models.qwen2_5_vl import Qwen25VLAdapter
    from adapttoken.training.tiny import build_tiny_model
    m2, p2 = build_tiny_model(seed=7, layers=4, vision_depth=2)
    assert _fresh(Qwen25VLAdapter(m2, p2), path, cache).disk_cache.key != key
    # the file changes (same length, other content): a miss
    write_video(path, 120, width=64, height=48, fps=8, gop=10, first_number=500)
    d = _fresh(tiny_adapter, path, cache)
    assert d.disk_cache.key != key
    d.ensure([0, 1])
    assert d.stats["cache_loaded_slices"] == 0 and d.decoded_frames == 4


def test_disk_cache_ignores_a_damaged_file(tiny_adapter, clip, tmp_path):
    cache = tmp_path / "cache"
    a = _fresh(tiny_adapter, clip, cache)
    a.ensure(np.arange(8))
    (f,) = list(cache.rglob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    b = _fresh(tiny_adapter, clip, cache)
    b.ensure(np.arange(8))
    assert b.encoded_slices == 8
    torch.testing.assert_close(_all(b)[:8], _reference(tiny_adapter, _video(clip))[:8],
                               rtol=1e-5, atol=1e-5)


def test_ask_with_cache_dir_second_model_object_decodes_nothing(tiny_model, clip, tmp_path):
    cfg = at.AdaptTokenConfig(num_frames=96, group_size=8, budget=24, cache_dir=str(tmp_path / "c"),
                              **PX)
    r1 = at.ask(tiny_model, clip, "What is shown?", options=("a", "b"), config=cfg,
                fresh_features=True)
    tiny_model.clear_cache()                              # a new process would start like this
    r2 = at.ask(tiny_model, clip, "What is shown?", options=("a", "b"), config=cfg)
    assert r1.decoded_frames == 96 and r2.decoded_frames == 0 and r2.encoded_slices == 0
    assert r2.option_probs == pytest.approx(r1.option_probs, abs=1e-5)
    assert r2.extra["features"]["cache_loaded_slices"] == 48


def test_cli_cache_dir_flag():
    from adapttoken.cli import build_parser, config_from_args
    args = build_parser().parse_args(["ask", "v.mp4", "q?", "--cache-dir", "/tmp/x",
                                      "--feature-device", "cpu", "--decode-workers", "0"])
    c = config_from_args(args)
    assert c.cache_dir == "/tmp/x" and c.feature_device == "cpu" and c.decode_workers == 0


# -- bench gpu on CPU ---------------------------------------------------------------------------

def test_bench_gpu_tiny_smoke(tmp_path):
    from adapttoken.bench.gpu import main
    out = tmp_path / "bench"
    rc = main(["--tiny", "--frames", "32", "64", "--size", "56x112", "--group-size", "8",
               "--budget", "32", "--out", str(out), "--video-frames", "64", "--disk-cache"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    methods = {(c["frames"], c["method"]) for c in res["cases"]}
    assert methods == {(L, m) for L in (32, 64) for m in
                       ("uniform", "adapttoken", "second_question", "lite")}
    by = {(c["frames"], c["method"]): c for c in res["cases"]}
    assert by[(64, "lite")]["group_passes"] == 1 and by[(64, "adapttoken")]["group_passes"] == 4
    assert by[(64, "second_question")]["decoded_frames"] == 0
    for c in res["cases"]:
        assert c["flops"]["total"] > 0 and c["wall"] > 0
        if c["method"] != "uniform":
            assert c["tokens"]["group_pass_calls"] == c["group_passes"]
    assert res["disk_cache"]["second_decoded"] == 0
    assert (out / "README.md").read_text().startswith("# `bench gpu`")
    assert (out / "bench_gpu.png").stat().st_size > 1000


def test_bench_gpu_source_size_decodes_a_larger_file_at_the_pixel_cap(tmp_path):
    """--source-size: the generated file has that size (a 1080p/4K-like source), the model sees
    frames resized to the --size pixel cap, and the report says both."""
    from adapttoken.bench.gpu import main
    from adapttoken.video import probe_video
    out = tmp_path / "bench"
    rc = main(["--tiny", "--frames", "32", "--size", "56x112", "--source-size", "216x384",
               "--group-size", "8", "--budget", "16", "--out", str(out), "--video-frames", "32",
               "--methods", "adapttoken"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    info = probe_video(out / "bench_32f_216x384.mp4")
    assert (info.height, info.width) == (216, 384) == (res["meta"]["video"]["height"],
                                                       res["meta"]["video"]["width"])
    rh, rw = res["meta"]["resized"]
    assert rh * rw <= 56 * 112 and abs(rw / rh - 384 / 216) < 0.3   # capped, aspect kept
    assert "216x384 H.264" in (out / "README.md").read_text()
    assert f"resized to {rh}x{rw}" in (out / "README.md").read_text()


# -- prefix key/value cache ---------------------------------------------------------------------

def test_second_question_reuses_group_prefix_kv_exactly(tiny_model, clip):
    cfg = at.AdaptTokenConfig(num_frames=96, group_size=8, budget=24, **PX)
    q1 = at.Question("What is shown?", ("a", "b", "c"))
    q2 = at.Question("Which colour came first in the video?", ("red", "blue"))
    at.ask(tiny_model, clip, q1, config=cfg, fresh_features=True)
    feats = tiny_model.features_for(at.open_video(clip, 96, **PX))
    kv = feats.prefix_kv
    assert kv.stored == 6 and kv.hits == 0
    calls = []
    h = tiny_model.adapter.text_model.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        warm = at.ask(tiny_model, clip, q2, config=cfg)
    finally:
        h.remove()
    assert kv.hits == 6 and warm.decoded_frames == 0
    n_suffix = len(tiny_model.adapter.build_prompt(q2).suffix_ids)
    assert calls[:6] == [n_suffix] * 6                     # group passes ran the question only
    feats.configure(prefix_cache=False)
    cold = at.ask(tiny_model, clip, q2, config=cfg)
    assert cold.option_probs == pytest.approx(warm.option_probs, abs=1e-5)
    for a, b in zip(warm.groups, cold.groups):
        assert a.entropy == pytest.approx(b.entropy, abs=1e-5) and a.budget == b.budget
    assert [k["slice"] for k in warm.kept_tokens] == [k["slice"] for k in cold.kept_tokens]
    feats.configure(prefix_cache=True)


def test_prefix_kv_host_tier_when_the_device_tier_is_full(tiny_model, clip):
    """No room in the device tier (cpu_bytes 0 here): the states go to the host tier, a second
    question uses them and gets exactly the fresh result; with the host tier off they are refused."""
    cfg = at.AdaptTokenConfig(num_frames=96, group_size=8, budget=24, prefix_host_bytes=2 ** 30,
                              prefix_host_format="exact", **PX)
    q1 = at.Question("What is shown?", ("a", "b", "c"))
    q2 = at.Question("Which colour came first in the video?", ("red", "blue"))
    tiny_model.clear_cache()
    feats = tiny_model.features_for(at.open_video(clip, 96, **PX))
    feats.prefix_kv.cpu_bytes = 0
    at.ask(tiny_model, clip, q1, config=cfg)
    kv = feats.prefix_kv
    assert kv.stored == kv.host_stored == 6 and kv.bytes == 0 and kv.host_used > 0 and kv.refused == 0
    warm = at.ask(tiny_model, clip, q2, config=cfg)
    assert kv.hits == 6
    feats.configure(prefix_cache=False)
    cold = at.ask(tiny_model, clip, q2, config=cfg)
    assert cold.option_probs == pytest.approx(warm.option_probs, abs=1e-5)
    for a, b in zip(warm.groups, cold.groups):
        assert a.entropy == pytest.approx(b.entropy, abs=1e-5)
    # host tier off: nothing fits anywhere, every group refused
    feats.configure(prefix_cache=True, prefix_host_bytes=0)
    feats.prefix_kv.cpu_bytes = 0
    at.ask(tiny_model, clip, q1, config=dataclasses.replace(cfg, prefix_host_bytes=0))
    assert feats.prefix_kv.refused == 6 and feats.prefix_kv.stored == 0
    with pytest.raises(at.InputError, match="prefix_host_bytes"):
        feats.configure(prefix_host_bytes=-1)
    tiny_model.clear_cache()
