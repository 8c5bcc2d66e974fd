"""FP8 weights and matmuls (quantization="fp8", models/fp8.py) on the CPU, where torch's FP8 GEMM
(`torch._scaled_mm`) runs too: the layer against a float reference of the same quantized numbers,
its error against the float layer, padding of shapes that are not multiples of 16, which layers of
a real model are converted, the errors, and the bundled model loaded in fp8 selecting and answering
as in float32. The CUDA side (bf16, compiled quantization): tests/gpu/test_gpu_quant.py."""
from __future__ import annotations

import pytest
import torch

import adapttoken as at
from adapttoken.defaults import BUNDLED_MODEL
from adapttoken.errors import InputError
from adapttoken.models import fp8, quant
from adapttoken.models.loading import LoadOptions

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(fp8._cpu_support() is not None,
                                reason="this torch build has no FP8 matmul on the CPU")


def _linear(k, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


@pytest.mark.parametrize("k,n,bias", [(64, 48, True), (20, 30, True), (3420, 16, False),
                                      (32, 1, True)])
def test_layer_equals_the_float_product_of_its_quantized_numbers(k, n, bias):
    """Float8Linear(x) == (x quantized per row) @ (W quantized per row)^T + b, computed in float64
    from the same float8 numbers and scales: the FP8 GEMM adds only float32 accumulation error.
    Shapes that are not multiples of 16 are padded with zeros (and sliced back)."""
    lin = _linear(k, n, bias)
    f8 = fp8.Float8Linear.from_linear(lin)
    assert f8.weight.dtype == fp8.FP8 and f8.weight.shape[0] % 16 == 0 and f8.weight.shape[1] % 16 == 0
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    y = f8(x)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    q, sa = fp8._quantize_rows(x.reshape(-1, k), f8.weight.shape[1] - k)
    assert q[:, k:].float().abs().max().item() == 0 if q.shape[1] > k else True
    xd = q.double()[:, :k] * sa.double()
    wd = f8.weight.double()[:n, :k] * f8.weight_scale.double().t()[:n]
    ref = xd @ wd.t() + (lin.bias.double() if bias else 0)
    torch.testing.assert_close(y.reshape(-1, n).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f8.dequantized_weight().double(), wd.float().double())


def test_error_against_the_float_layer_is_float8_sized():
    """e4m3 keeps 3 mantissa bits (relative rounding <= 1/16 per element): a 1024-long dot product
    of quantized rows lands within a few percent of the float one, and the largest element of
    each row is exact (it maps to 448)."""
    lin = _linear(1024, 256, bias=False)
    f8 = fp8.Float8Linear.from_linear(lin)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2))
    y, ref = f8(x), lin(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.05, rel
    w = f8.dequantized_weight()
    rows = lin.weight.abs().argmax(dim=1)
    idx = torch.arange(256)
    torch.testing.assert_close(w[idx, rows], lin.weight[idx, rows].float(), rtol=1e-6, atol=0)


def test_bf16_inputs_give_bf16_outputs_and_empty_inputs_work():
    lin = _linear(64, 32).to(torch.bfloat16)
    f8 = fp8.Float8Linear.from_linear(lin)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    assert f8(x).dtype == torch.bfloat16
    assert f8(x[:0]).shape == (0, 32)
    rel = ((f8(x).float() - lin(x).float()).norm() / lin(x).float().norm()).item()
    assert rel < 0.06, rel


def _tiny_qwen():
    from transformers import Qwen2_5_VLForConditionalGeneration as C

    from adapttoken.bench.gpu_measure import TINY_TEXT, TINY_VISION, build_config
    from adapttoken.training.tiny import build_tokenizer
    torch.manual_seed(0)
    return C(build_config(build_tokenizer(), TINY_TEXT, TINY_VISION)).eval()


def test_convert_covers_decoder_and_vision_blocks_and_keeps_head_and_merger():
    m = _tiny_qwen()
    linears = {n for n, mod in m.named_modules() if type(mod) is torch.nn.Linear}
    info = fp8.convert(m)
    converted = {n for n, mod in m.named_modules() if isinstance(mod, fp8.Float8Linear)}
    kept = {n for n, mod in m.named_modules() if type(mod) is torch.nn.Linear}
    assert converted | kept == linears and info["layers"] == len(converted)
    assert "model.language_model.layers.0.self_attn.q_proj" in converted
    assert "model.language_model.layers.0.mlp.down_proj" in converted
    assert "model.visual.blocks.0.attn.qkv" in converted
    assert any(n.startswith("model.visual.blocks.0.mlp.") for n in converted)
    assert kept and all(n == "lm_head" or ".merger." in n for n in kept), kept
    assert info["bytes_after"] < 0.3 * info["bytes_before"]          # float32 -> float8 + scales
    assert quant.quantization_of(m) == "fp8" and fp8.is_fp8(m)


def test_device_errors(monkeypatch):
    with pytest.raises(InputError, match="CUDA GPU .*8.9.*or the CPU"):
        fp8.check_device(torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        quant.check_device("fp8", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(InputError, match="A100.*8.0: use quantization none"):
        fp8.check_device(torch.device("cuda", 0))
    monkeypatch.setattr(fp8, "_cpu_support", lambda: "RuntimeError: no kernel")
    with pytest.raises(InputError, match="no FP8 matmul there"):
        fp8.check_device(CPU)


def test_load_options_and_tensor_parallel():
    o = LoadOptions(quantization="fp8")
    kw = o.pretrained_kwargs(CPU, torch.float32)
    assert kw == {"device_map": {"": "cpu"}}            # no quantization_config: converted after

    class Layout:
        tp = 2
    with pytest.raises(InputError, match="tensor parallel"):
        LoadOptions(layout=Layout(), quantization="fp8").check()


def test_bundled_model_in_fp8_selects_and_answers_like_fp32():
    """load_model(quantization="fp8") on the CPU: the bundled model's decoder and vision tower in
    float8; on the shipped sample the same answer as float32, >= 90% of the same kept tokens and
    every group's H/H_max within 0.02 (the issue's agreement bounds)."""
    from adapttoken.demo import demo_config
    cfg = demo_config(512)
    q = ("What colour was the object that appeared in the video?", ["red", "green", "blue", "yellow"])
    ref = at.ask(at.load_model(BUNDLED_MODEL, device="cpu"), str(BUNDLED_MODEL.parent / "sample.mp4"),
                 q[0], options=q[1], config=cfg)
    model = at.load_model(BUNDLED_MODEL, device="cpu", quantization="fp8")
    hf = model.adapter.model
    assert isinstance(hf.model.language_model.layers[0].mlp.down_proj, fp8.Float8Linear)
    assert isinstance(hf.model.visual.blocks[0].attn.qkv, fp8.Float8Linear)
    assert type(hf.lm_head) is torch.nn.Linear
    assert model.adapter.dtype == torch.float32                 # not the float8 weights' dtype
    res = at.ask(model, str(BUNDLED_MODEL.parent / "sample.mp4"), q[0], options=q[1], config=cfg)
    assert res.answer == ref.answer
    a = {(t["slice"], t["row"], t["col"]) for t in ref.kept_tokens}
    b = {(t["slice"], t["row"], t["col"]) for t in res.kept_tokens}
    assert len(a & b) >= 0.9 * len(a), (len(a & b), len(a))
    n = 0
    for g0, g1 in zip(ref.groups, res.groups):
        if g0.entropy is not None and g1.entropy is not None:
            n += 1
            assert abs(g0.entropy_norm - g1.entropy_norm) <= 0.02, (g0.group, g0.entropy_norm,
                                                                    g1.entropy_norm)
    assert n >= 1


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "llava_onevision"])
def test_every_family_runs_in_fp8(family):
    """The other families' tiny models converted in place (bench gpu --arch ... --quantization fp8
    does this): their language model and vision tower linears in float8, a group pass with the probe
    runs and stays close to the float one (same top option)."""
    from adapttoken.models.loading import _families
    from adapttoken.question import Question
    from adapttoken.training.tiny_families import build_tiny_family
    model, proc = build_tiny_family(family, seed=0, layers=2)
    a = _families()[family](model, proc)
    h, w = (64, 96) if family == "qwen3_vl" else a.resized_size(0, 0)
    frames = torch.randint(0, 256, (4 * a.frames_per_slice, h, w, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def group_pass():
        feats = a.encode(frames, (h, w))
        n, t, d = feats.shape
        rows, cols = a.token_grid((h, w))
        s, r, c = torch.meshgrid(torch.arange(n), torch.arange(rows), torch.arange(cols), indexing="ij")
        coords = torch.stack([s.reshape(-1), r.reshape(-1), c.reshape(-1)])
        prompt = a.build_prompt(Question("What happens?", ("a dog runs", "a cat sleeps")))
        return a.forward(prompt, feats.reshape(n * t, d), coords, max(n - 1, rows - 1, cols - 1),
                         probe_layer=a.default_layer)

    ref = group_pass()
    quant.quantize_in_memory(model, "fp8", CPU)                # converts in place
    assert fp8.convert(model)["layers"] == 0                   # nothing plain left to convert
    assert quant.quantization_of(model) == "fp8"
    assert not any(type(m) is torch.nn.Linear and ".layers." in n for n, m in model.named_modules())
    out = group_pass()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.scores).all()
    rel = ((out.logits - ref.logits).norm() / ref.logits.norm()).item()
    assert rel < 0.1, rel


def test_casting_a_converted_model_fails_clearly():
    m = torch.nn.Sequential(_linear(32, 16))
    fp8.convert(m)
    m.float()                                   # casts the float8 weight too (a user mistake)
    with pytest.raises(RuntimeError, match="load it again with quantization='fp8'"):
        m(torch.randn(2, 32))
