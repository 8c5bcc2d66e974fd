"""On a CUDA machine: the same question asked cold, then warm (group prefixes from the
PrefixKVCache), then cold in a freshly loaded model gives bit-identical kept tokens, per-group
entropies and answer, for the bundled model (4 synthetic 2048-frame videos) and for the 7B
architecture with random weights (1024 frames at 308x560). Skipped without CUDA.

    python -m pytest tests/gpu -q -p no:cacheprovider -s"""
from __future__ import annotations

import gc

import pytest
import torch

import adapttoken as at

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _facts(res):
    return {"answer": res.answer, "option_probs": res.option_probs,
            "entropies": [g.entropy for g in res.groups], "kept_tokens": res.kept_tokens}


def _cold_warm_cold(make_model, video, question, cfg):
    model = make_model()
    cold = at.ask(model, video, question, config=cfg, fresh_features=True)
    (feats,) = model._features.values()
    kv = feats.prefix_kv
    stored = kv.stored
    warm = at.ask(model, video, question, config=cfg)
    hits = kv.hits
    model.clear_cache()
    del model, feats, kv
    gc.collect()
    torch.cuda.empty_cache()
    fresh = make_model()
    cold2 = at.ask(fresh, video, question, config=cfg, fresh_features=True)
    fresh.clear_cache()
    a, b, c = _facts(cold), _facts(warm), _facts(cold2)
    diff = {k: (a[k] == b[k], a[k] == c[k]) for k in a}
    print(f"{video}: groups {len(cold.groups)}, stored {stored}, hits {hits}, equal "
          f"(cold==warm, cold==fresh cold): {diff}, group_pass s cold {cold.seconds.get('group_pass')} "
          f"warm {warm.seconds.get('group_pass')}")
    assert stored == hits == len(cold.groups)
    assert all(x == (True, True) for x in diff.values()), diff


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_bundled_model_2048_frames(tmp_path, seed):
    from adapttoken.defaults import BUNDLED_MODEL
    from adapttoken.demo import demo_config
    from adapttoken.training import synthetic as syn
    s = syn.make_sample(tmp_path / "v.mp4", 2048, seed, kind="what", form="mc", attribute="colour")
    q = at.Question(s.questions[0].text, s.questions[0].options)
    _cold_warm_cold(lambda: at.load_model(BUNDLED_MODEL, device="cuda"), s.video_path, q,
                    demo_config(2048))


def test_7b_random_architecture_1024_frames(tmp_path):
    from adapttoken.bench.gpu_measure import build_model
    from adapttoken.training import synthetic as syn
    px = 308 * 560
    s = syn.make_sample(tmp_path / "v.mp4", 1024, 5, kind="what", form="mc", attribute="colour")
    q = at.Question(s.questions[0].text, s.questions[0].options)
    cfg = at.AdaptTokenConfig(num_frames=1024, max_pixels=px, min_pixels=px, group_size=64,
                              budget=7040, max_new_tokens=4)
    _cold_warm_cold(lambda: build_model(False, torch.device("cuda"), torch.bfloat16, px)[0],
                    s.video_path, q, cfg)
