"""Quantized weights on CUDA (`python tests/gpu/run.py`; needs bitsandbytes: pip install -e
".[quant]"): the bundled model loaded in nf4 and int8 runs the probe, the entropy and the selection,
and agrees with bf16 on the demo's needle video (frames in memory): the kept tokens overlap and each
group's H/H_max moves little. docs/bench_gpu_quant has the measured numbers."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on a GPU machine: python tests/gpu/run.py)", allow_module_level=True)

import adapttoken as at                                              # noqa: E402
from adapttoken.defaults import BUNDLED_MODEL                        # noqa: E402

CUDA = torch.device("cuda")
FRAMES = 2048
MIN_OVERLAP = 0.9          # |kept & kept_bf16| / |kept_bf16|
MAX_DH = 0.05              # |H/H_max - H_bf16/H_max| per group


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        pytest.fail('bitsandbytes is not installed: pip install -e ".[quant]" before the GPU tests')
    return bitsandbytes


@pytest.fixture(scope="module")
def needle_video():
    from adapttoken.bench.gpu import MemoryVideo
    from adapttoken.demo import DEMO_ATTRIBUTE
    from adapttoken.training import synthetic as syn
    needles, qs = syn.plan(FRAMES, 0, "what", "mc", attribute=DEMO_ATTRIBUTE)
    frames = torch.from_numpy(syn.make_frames(FRAMES, 0, syn.DEFAULT_SIZE, needles))
    return MemoryVideo(frames, syn.DEFAULT_FPS, name="needle"), qs[0]


def _run(model, video, q, redundancy=0.9):
    from adapttoken.demo import demo_config
    from adapttoken.pipeline import answer, select
    cfg = demo_config(FRAMES)
    cfg.redundancy_threshold = redundancy
    handle = video.open(FRAMES, cfg.max_pixels, cfg.min_pixels, model.adapter.frames_per_slice)
    model.clear_cache()
    sel = select(model, handle, at.Question(q.text, tuple(q.options)), cfg, "adapttoken")
    res = answer(sel, cfg.max_new_tokens)
    kept = {(t["slice"], t["row"], t["col"]) for t in res.kept_tokens}
    return res, kept, [g.entropy_norm for g in res.groups if g.entropy is not None]


def assert_agrees(label, ref, got, answer, max_dh):
    """`got` (a _run result) against `ref`: both give `answer`, >= MIN_OVERLAP of ref's kept
    tokens kept, every group's H/H_max within max_dh."""
    (ref_res, ref_kept, ref_h), (res, kept, h) = ref, got
    assert res.answer == ref_res.answer == answer, (res.answer, ref_res.answer, answer)
    overlap = len(kept & ref_kept) / len(ref_kept)
    dh = [abs(a - b) for a, b in zip(h, ref_h)]
    print(f"{label}: kept {len(kept)} vs {len(ref_kept)}, overlap {overlap:.3f}, "
          f"|dH/Hmax| mean {sum(dh) / len(dh):.4f} max {max(dh):.4f}")
    assert len(h) == len(ref_h)
    assert overlap >= MIN_OVERLAP, overlap
    assert max(dh) <= max_dh, dh


@pytest.fixture(scope="module")
def bf16(needle_video):
    model = at.load_model(BUNDLED_MODEL, dtype="bf16", device=CUDA)
    video, q = needle_video
    out = {r: _run(model, video, q, r) for r in (0.9, None)}
    del model
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_bundled_model_selects_like_bf16_on_cuda(quantization, needle_video, bf16):
    bnb = _bnb()
    video, q = needle_video
    model = at.load_model(BUNDLED_MODEL, dtype="bf16", device=CUDA, quantization=quantization)
    hf = model.adapter.model
    want = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    layer = hf.model.language_model.layers[model.adapter.default_layer]
    assert isinstance(layer.self_attn.q_proj, want) and isinstance(layer.mlp.up_proj, want)
    assert type(hf.lm_head) is torch.nn.Linear and type(hf.model.visual.blocks[0].attn.qkv) is torch.nn.Linear
    assert model.adapter.dtype == torch.bfloat16 and model.adapter.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in hf.parameters())
    for redundancy in (0.9, None):           # the demo's setting, and every token a candidate
        assert_agrees(f"{quantization} redundancy={redundancy}", bf16[redundancy],
                      _run(model, video, q, redundancy), q.answer, MAX_DH)
