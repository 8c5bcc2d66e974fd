"""FP8 weights and matmuls (``quantization="fp8"``): the linear layers of the language model and the
vision tower as float8 (e4m3) weights with one scale per output row, multiplied by activations
quantized to float8 per row at run time, through PyTorch's own FP8 GEMM (``torch._scaled_mm``, row-wise
scales, the bf16 result). On an H100/H200 float8 matmuls run at about twice the bf16 rate
(docs/PERF_NOTES.md); the weights take half the memory.

How: ``convert(model)`` swaps each ``nn.Linear`` it covers for a ``Float8Linear`` (a subclass of
``nn.Linear``, set with ``Module.set_submodule``): transformers' modules are otherwise untouched and
call their projections as before; the attention probe, Cancel's hooks and the compiled norm/MLP calls
see ordinary modules. Kept in the load dtype: the LM head (the option letters' logits, hence each
group's entropy, come from it), the vision merger / projectors (every visual token passes through
them once, a small cost), embeddings and convolutions (not linear layers).

Why not a library's FP8 path: torchao's float8 inference (``Float8DynamicActivationFloat8WeightConfig``)
refuses to build without a CUDA GPU of compute capability 8.9+, so nothing of it could be tested on a
CPU, and its wheels follow torch's releases one to one; transformers' ``FineGrainedFP8Config`` runs
block-wise kernels that its 5.2x releases fetch from the model hub at first use (nothing is fetched
here). ``torch._scaled_mm`` runs on the CPU as well (tests compare it with a float reference).

Shapes: ``_scaled_mm`` wants both matmul dimensions multiples of 16. A weight whose in/out features are
not (Qwen2.5-VL's vision MLP: 3420) is zero-padded once at conversion; the activations get the same
zero columns when quantized (fused into the quantizing kernel) and the extra outputs are sliced off.

Numerics: each activation row and each weight row is scaled so its largest magnitude maps to 448
(e4m3's largest), rounded to float8 (3 mantissa bits: ~3% relative error per element), multiplied
with float32 accumulation; agreement with bf16 is measured in docs/bench_gpu_fp8.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..errors import InputError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)          # 448
_TINY = 1e-12

# Name parts whose linear layers stay in the load dtype (see the module docstring).
FP8_SKIP = ("lm_head", "merger", "multi_modal_projector", "mlp1", "deepstack_merger")

__all__ = ["Float8Linear", "convert", "check_device", "is_fp8", "FP8_SKIP"]

_STATE: dict = {"quantize": None, "failed": False}


def _pad16(n: int) -> int:
    return (-n) % 16


def _quantize_rows(x2: torch.Tensor, k_pad: int):
    """[M, K] -> (float8 [M, K + k_pad], float32 scale [M, 1]) with x ~= q * scale per row."""
    amax = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=_TINY)
    q = (x2.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX)
    if k_pad:
        q = F.pad(q, (0, k_pad))
    return q.to(FP8), amax / FP8_MAX


def _quantize(x2: torch.Tensor, k_pad: int):
    """`_quantize_rows`, one fused kernel on CUDA when called eagerly (an eager call makes four passes
    over the activations); inside a compiled graph (the compiled MLP, the vision blocks) it is traced
    into that graph. A failed compile warns once and stays eager."""
    if not x2.is_cuda or torch.compiler.is_compiling() or _STATE["failed"]:
        return _quantize_rows(x2, k_pad)
    try:
        if _STATE["quantize"] is None:
            _STATE["quantize"] = torch.compile(_quantize_rows, dynamic=True)
        return _STATE["quantize"](x2, k_pad)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - compiling is an optimisation, eager is the product
        _STATE["failed"] = True
        warnings.warn(f"fp8: compiling the activation quantization failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); quantizing eagerly from now on", RuntimeWarning)
        return _quantize_rows(x2, k_pad)


def quantize_weight(w: torch.Tensor):
    """[N, K] float weight -> (float8 [N + pad, K + pad], float32 scale [1, N + pad]); padded rows
    and columns are zeros (scale 1)."""
    n, k = w.shape
    q, scale = _quantize_rows(w.detach(), _pad16(k))
    if _pad16(n):
        q = torch.cat([q, torch.zeros(_pad16(n), q.shape[1], dtype=FP8, device=q.device)])
        scale = torch.cat([scale, torch.ones(_pad16(n), 1, device=scale.device)])
    return q, scale.t().contiguous()


class Float8Linear(torch.nn.Linear):
    """An ``nn.Linear`` holding its weight in float8 with per-row scales (``weight_scale``, [1, N]);
    ``forward`` quantizes the input per row and calls ``torch._scaled_mm``. Built from a float
    ``nn.Linear`` by ``from_linear`` (the float weight is not kept)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features + _pad16(out_features), in_features + _pad16(in_features))
        self.weight = torch.nn.Parameter(torch.zeros(shape, dtype=FP8, device=device),
                                         requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(1, shape[0], device=device))
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                        requires_grad=False) if bias else None)
        self.out_dtype = dtype or torch.get_default_dtype()

    @classmethod
    def from_linear(cls, lin: torch.nn.Linear) -> "Float8Linear":
        w = lin.weight
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=w.dtype)
        q, scale = quantize_weight(w)
        new.weight = torch.nn.Parameter(q, requires_grad=False)
        new.weight_scale = scale
        new.bias = (None if lin.bias is None
                    else torch.nn.Parameter(lin.bias.detach(), requires_grad=False))
        new.out_dtype = w.dtype
        return new

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the matmul uses, [out, in] float32 (tests, agreement checks)."""
        w = self.weight.float() * self.weight_scale.t()
        return w[:self.out_features, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != FP8:
            raise RuntimeError(f"Float8Linear({self.in_features}, {self.out_features}): its weight is "
                               f"{self.weight.dtype}, not float8 (the model was cast with .to(dtype), "
                               f".half() or .float() after the fp8 conversion): load it again with "
                               f"quantization='fp8' instead of casting it")
        k, n = self.in_features, self.out_features
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        out_dtype = x.dtype if x.dtype.is_floating_point and x.dtype.itemsize > 1 else self.out_dtype
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, n, dtype=out_dtype)
        q, scale = _quantize(x2, self.weight.shape[1] - k)
        # CUDA's row-wise FP8 GEMM writes bf16 only; other dtypes are cast from it
        mm_dtype = torch.bfloat16 if x.is_cuda else out_dtype
        pad_n = self.weight.shape[0] != n
        fuse_bias = self.bias is not None and not pad_n and self.bias.dtype == mm_dtype
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                             bias=self.bias if fuse_bias else None, out_dtype=mm_dtype)
        if pad_n:
            y = y[:, :n]
        if y.dtype != out_dtype:
            y = y.to(out_dtype)
        if self.bias is not None and not fuse_bias:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*lead, n)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, float8 weights (row scales)"


def _skipped(name: str, skip) -> bool:
    parts = name.split(".")
    return any(p.startswith(s) for s in skip for p in parts)


def convert(model: torch.nn.Module, skip=FP8_SKIP) -> dict:
    """Swap every plain ``nn.Linear`` of `model` whose name has no part in `skip` for a
    ``Float8Linear`` (in place, one layer at a time: the float weights are freed as it goes).
    Returns {"layers": how many, "bytes_before", "bytes_after"} of the converted weights."""
    names = [n for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and not _skipped(n, skip)]
    before = after = 0
    for name in names:
        lin = model.get_submodule(name)
        before += lin.weight.numel() * lin.weight.element_size()
        new = Float8Linear.from_linear(lin)
        after += new.weight.numel() + new.weight_scale.numel() * 4
        model.set_submodule(name, new)
        del lin
    return {"layers": len(names), "bytes_before": before, "bytes_after": after}


def is_fp8(model: torch.nn.Module) -> bool:
    return any(isinstance(m, Float8Linear) for m in model.modules())


def _cpu_support() -> str | None:
    try:
        a = torch.zeros(16, 16, dtype=FP8)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure means: not on this CPU build
        return f"{type(e).__name__}: {str(e)[:160]}"
    return None


def check_device(device: torch.device) -> None:
    """InputError (saying what to do) unless float8 matmuls run on `device`: a CUDA GPU of compute
    capability 8.9 or later (H100/H200, L4/L40, RTX 40xx and newer), or a CPU whose torch build has
    FP8 matmuls (slow there; for tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"quantization='fp8' on device {str(device)!r}: no CUDA GPU is "
                             f"available here; use --quantization none")
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cc = torch.cuda.get_device_capability(idx)
        if cc < (8, 9):
            name = torch.cuda.get_device_name(idx)
            raise InputError(f"quantization='fp8' needs a GPU with FP8 matmuls (compute capability "
                             f"8.9 or later: H100/H200, L4/L40, RTX 40xx); {name} is {cc[0]}.{cc[1]}: "
                             f"use quantization none (bf16) or nf4/int8")
        return
    if device.type == "cpu":
        why = _cpu_support()
        if why is not None:
            raise InputError(f"quantization='fp8' on the CPU: this torch ({torch.__version__}) has "
                             f"no FP8 matmul there ({why}); use a CUDA GPU with FP8 or "
                             f"--quantization none")
        return
    raise InputError(f"quantization='fp8' on device {str(device)!r}: FP8 matmuls run here on a "
                     f"CUDA GPU (compute capability 8.9+) or the CPU; use one of those, or "
                     f"--quantization none")
