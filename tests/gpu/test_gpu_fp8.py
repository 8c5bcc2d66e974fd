"""FP8 weights and matmuls on CUDA (`python tests/gpu/run.py`; a GPU with FP8: compute capability
8.9+): the layer through CUDA's row-wise FP8 GEMM against a float64 product of the same quantized
numbers (padded shapes too, the activation quantization compiled), and the bundled model loaded with
quantization="fp8" agreeing with bf16 on the demo's needle video: the same answer, >= 90% of the
kept tokens, every group's H/H_max within 0.02. docs/bench_gpu_fp8 has the 20-video and 7B
measurements."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (run on a GPU machine: python tests/gpu/run.py)", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a GPU with FP8 matmuls (compute capability 8.9+)", allow_module_level=True)

import adapttoken as at                                              # noqa: E402
from adapttoken.defaults import BUNDLED_MODEL                        # noqa: E402
from adapttoken.models import fp8                                    # noqa: E402
# the demo's needle video and one pipeline run, as the nf4/int8 test uses them
from test_gpu_quant import _run, assert_agrees, needle_video         # noqa: E402,F401

CUDA = torch.device("cuda")


@pytest.mark.parametrize("k,n", [(3584, 512), (3420, 1280), (1280, 3420), (40, 24)])
def test_cuda_layer_equals_the_product_of_its_quantized_numbers(k, n):
    g = torch.Generator(device="cpu").manual_seed(k + n)
    lin = torch.nn.Linear(k, n).to(CUDA, torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_((0.03 * torch.randn(n, k, generator=g)).to(CUDA))
        lin.bias.copy_(torch.randn(n, generator=g).to(CUDA))
    f8 = fp8.Float8Linear.from_linear(lin)
    x = torch.randn(2, 333, k, generator=g).to(CUDA, torch.bfloat16)
    y = f8(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 333, n)
    assert fp8._STATE["quantize"] is not None and not fp8._STATE["failed"]   # compiled on CUDA
    q, sa = fp8._quantize_rows(x.reshape(-1, k), f8.weight.shape[1] - k)
    ref = (q.double()[:, :k] * sa.double()) @ f8.dequantized_weight().double().t() + lin.bias.double()
    err = (y.reshape(-1, n).double() - ref).abs().max().item()
    assert err <= 2 ** -7 * ref.abs().max().item(), err        # bf16 rounding of the output
    rel = ((y.float() - lin(x).float()).norm() / lin(x).float().norm()).item()
    assert rel < 0.06, rel                                     # float8 rounding of both operands


def test_bundled_model_in_fp8_selects_like_bf16_on_cuda(needle_video):
    video, q = needle_video
    ref_model = at.load_model(BUNDLED_MODEL, dtype="bf16", device=CUDA)
    refs = {r: _run(ref_model, video, q, r) for r in (0.9, None)}
    del ref_model
    torch.cuda.empty_cache()
    model = at.load_model(BUNDLED_MODEL, dtype="bf16", device=CUDA, quantization="fp8")
    hf = model.adapter.model
    layer = hf.model.language_model.layers[model.adapter.default_layer]
    assert isinstance(layer.self_attn.q_proj, fp8.Float8Linear)
    assert isinstance(hf.model.visual.blocks[0].attn.qkv, fp8.Float8Linear)
    assert type(hf.lm_head) is torch.nn.Linear
    assert model.adapter.dtype == torch.bfloat16 and model.adapter.device.type == "cuda"
    for redundancy in (0.9, None):
        assert_agrees(f"fp8 redundancy={redundancy}", refs[redundancy], _run(model, video, q, redundancy),
                      q.answer, 0.02)
