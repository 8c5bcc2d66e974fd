"""Quantized weights (bitsandbytes, through transformers' `BitsAndBytesConfig`): the language
model's linear layers in 4-bit NF4 or 8-bit (LLM.int8), for cards too small for bf16 weights.

- "nf4": 4-bit NormalFloat weights, double quantization (the block scales quantized too, ~0.4
  bits/param saved), computed in the load dtype (bf16 on a recent GPU): Qwen2.5-VL-7B's weights
  take 6.5 GiB on the GPU instead of 15.5 GiB (docs/bench_gpu_quant);
- "int8": LLM.int8 (8-bit weights, outlier columns in 16-bit);
- "fp8": float8 weights AND float8 matmuls for the language model's and the vision tower's linear
  layers (models/fp8.py: torch's FP8 GEMM, no bitsandbytes), for speed on GPUs with FP8 (H100/H200):
  the model is loaded in `dtype`, then its linear layers are converted in place;
- None / "none": the weights as `dtype`.

Kept in the load dtype (QUANT_SKIP_MODULES): the vision tower and its merger/projector (every
visual token passes through them: quantizing them would move every feature, for ~1 GB of a 7B
model), and the LM head (transformers' default: the option letters' logits, hence each group's
entropy, come straight from it). The embeddings are never quantized (bitsandbytes quantizes linear
layers only). The probe layer's q/k projections are quantized like the rest of the decoder: the
hidden states that reach them already carry the error of the layers below, and keeping those two
projections unquantized changed one kept token of 256 on the bundled model (docs/bench_gpu_quant,
which also has the vision tower quantized: less agreement).

A quantized model is placed by from_pretrained on its device and never moved afterwards
(LoadOptions.places_itself): bitsandbytes weights are not moved between devices by `.to()` here.
"""
from __future__ import annotations

import torch

from ..errors import InputError

QUANTIZATIONS = ("nf4", "int8", "fp8")
BNB = ("nf4", "int8")                      # the ones bitsandbytes stores
CHOICES = ("none",) + QUANTIZATIONS          # what the CLI and the ComfyUI node offer
INSTALL = 'pip install "adapttoken[quant]"  (or: pip install bitsandbytes accelerate)'

# Module names (prefixes, as transformers matches llm_int8_skip_modules) kept unquantized: the vision
# towers and projectors of every supported family, and the LM head.
QUANT_SKIP_MODULES = ("model.visual", "model.vision_tower", "model.multi_modal_projector", "lm_head")


def normalize(quantization) -> str | None:
    """None for no quantization ("none", "", None), else one of QUANTIZATIONS; InputError otherwise."""
    if quantization is None:
        return None
    q = str(quantization).strip().lower()
    if q in ("", "none"):
        return None
    if q not in QUANTIZATIONS:
        raise InputError(f"quantization={quantization!r} is not known: use none, nf4 (4-bit) or "
                         f"int8 (8-bit), bitsandbytes weights, or fp8 (float8 matmuls on an "
                         f"H100/H200-class GPU)")
    return q


def require_bitsandbytes(quantization: str):
    """The bitsandbytes module, or an InputError naming the pip command (accelerate too: transformers
    needs it to load bitsandbytes weights)."""
    try:
        import bitsandbytes
    except ImportError:
        raise InputError(f"quantization={quantization!r} needs the bitsandbytes package, which is "
                         f"not installed: {INSTALL}") from None
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise InputError(f"quantization={quantization!r} needs the accelerate package besides "
                         f"bitsandbytes: {INSTALL}") from None
    return bitsandbytes


def _runs_on_cpu(quantization: str) -> str | None:
    """None when the installed bitsandbytes quantizes and multiplies on the CPU (recent releases do),
    else the reason it cannot."""
    import bitsandbytes.functional as F
    try:
        x = torch.randn(64, 64)
        if quantization == "nf4":
            w, state = F.quantize_4bit(x, quant_type="nf4")
            F.dequantize_4bit(w, state)
        else:
            F.int8_vectorwise_quant(x.half())
    except Exception as e:  # noqa: BLE001 - any failure means: not on this CPU
        return f"{type(e).__name__}: {str(e)[:160]}"
    return None


def check_device(quantization: str, device: torch.device) -> None:
    """bitsandbytes installed, and able to run `quantization` on `device` (a CUDA GPU, or the CPU
    where the installed release supports it); InputError saying what to do otherwise."""
    if quantization == "fp8":
        from . import fp8
        fp8.check_device(device)
        return
    bnb = require_bitsandbytes(quantization)
    version = getattr(bnb, "__version__", "?")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"quantization={quantization!r} on device {str(device)!r}: no CUDA GPU "
                             f"is available here; use --device cpu (bitsandbytes {version} on the "
                             f"CPU), or --quantization none")
        return
    if device.type == "cpu":
        why = _runs_on_cpu(quantization)
        if why is not None:
            raise InputError(f"quantization={quantization!r} on the CPU: this bitsandbytes "
                             f"({version}) cannot run it there ({why}); use a CUDA GPU, upgrade "
                             f"bitsandbytes (0.48 or later runs 4-bit and 8-bit on the CPU), or "
                             f"--quantization none")
        return
    raise InputError(f"quantization={quantization!r} on device {str(device)!r}: bitsandbytes "
                     f"weights run here on a CUDA GPU or the CPU; use one of those, or "
                     f"--quantization none")


def bnb_config(quantization: str, dtype: torch.dtype, skip_modules=QUANT_SKIP_MODULES):
    """transformers' BitsAndBytesConfig for `quantization`, computing in `dtype`."""
    from transformers import BitsAndBytesConfig
    skip = list(skip_modules) if skip_modules is not None else None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                                  llm_int8_skip_modules=skip)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise InputError(f"quantization={quantization!r} is not known: use none, nf4 or int8")


def device_map_for(device: torch.device) -> dict:
    """from_pretrained's device_map putting every weight on `device` (bitsandbytes quantizes while
    loading onto it)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": str(device)}


def pretrained_kwargs(quantization: str, dtype: torch.dtype, device: torch.device,
                      device_map: str | None = None) -> dict:
    """Keyword arguments of from_pretrained for a quantized load on `device` (or spread by
    accelerate when device_map="auto")."""
    check_device(quantization, device)
    kw = {} if quantization == "fp8" else {"quantization_config": bnb_config(quantization, dtype)}
    if not device_map:
        kw["device_map"] = device_map_for(device)
    return kw


def after_load(model, quantization: str | None):
    """What a quantization does once from_pretrained has placed the model: "fp8" converts the
    linear layers in place (fp8.convert); bitsandbytes has already quantized while loading."""
    if quantization == "fp8":
        from . import fp8
        fp8.convert(model)
    return model


def quantization_of(model) -> str | None:
    """"nf4" / "int8" for a model whose weights bitsandbytes holds, "fp8" for one with float8 linear
    layers (models/fp8.py), None otherwise."""
    from .fp8 import is_fp8
    if is_fp8(model):
        return "fp8"
    if getattr(model, "is_loaded_in_4bit", False):
        return "nf4"
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    return None


def is_quantized(model) -> bool:
    """True for a quantized model: it stays where it was loaded (never moved with .to(); float8
    weights could move, but are kept on the GPU they were converted on, like bitsandbytes ones)."""
    return quantization_of(model) is not None


def quantize_in_memory(model, quantization: str, device: torch.device,
                       skip_modules=QUANT_SKIP_MODULES):
    """A bitsandbytes copy of an in-memory model (random weights, nothing on disk): transformers'
    own quantizing load over the model's state dict (from_pretrained(None, state_dict=...)), the
    path a folder takes. The caller drops the original."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    check_device(quantization, device)
    if quantization == "fp8":                 # in place: the same weights, linear layers in float8
        return after_load(model.to(device), "fp8").eval().requires_grad_(False)
    cls = type(model)
    sd = model.state_dict()
    q = cls.from_pretrained(None, config=model.config, state_dict=sd, dtype=dtype,
                            quantization_config=bnb_config(quantization, dtype, skip_modules),
                            device_map=device_map_for(device))
    del sd
    return q.eval().requires_grad_(False)


class RandomWeights(dict):
    """A state dict of random weights drawn only when read, for `random_quantized`: each value is a
    `_Draw`, which transformers' loading materialises with `value[...]` (the laziness its own
    safetensors loading relies on), so one weight at a time exists unquantized. Weights of two or
    more dimensions are N(0, std); one-dimensional ones (norms) ones, biases zeros. Draws are
    seeded per name: the same seed gives the same weights. `peak_live` / `drawn`: how many drawn
    tensors were alive at once at most / in all (tests check that the load is one at a time)."""

    def __init__(self, shapes: dict, device: torch.device, dtype: torch.dtype, std: float,
                 seed: int = 0):
        super().__init__()
        self.live = self.peak_live = self.drawn = 0
        for i, (name, shape) in enumerate(shapes.items()):
            self[name] = _Draw(self, name, tuple(shape), device, dtype, std, seed * 1_000_003 + i)

    def _born(self, t: torch.Tensor) -> None:
        import weakref
        self.live += 1
        self.drawn += 1
        self.peak_live = max(self.peak_live, self.live)
        weakref.finalize(t, self._died)

    def _died(self) -> None:
        self.live -= 1


class _Draw:
    """One weight of RandomWeights, drawn on `device` when transformers reads it (`value[...]`)."""

    def __init__(self, owner, name, shape, device, dtype, std, seed):
        self.owner, self.name, self.shape = owner, name, shape
        self.device, self.dtype, self.std, self.seed = device, dtype, std, seed

    def get_shape(self):                       # the safetensors slice interface
        return list(self.shape)

    def get_dtype(self):
        return str(self.dtype).removeprefix("torch.")

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"{self.name}: only value[...] (the whole weight) is drawn")
        if len(self.shape) >= 2:
            g = torch.Generator(device=self.device).manual_seed(self.seed)
            t = torch.empty(self.shape, device=self.device, dtype=self.dtype)
            t.normal_(0.0, self.std, generator=g)
        elif self.name.endswith(".bias"):
            t = torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        else:
            t = torch.ones(self.shape, device=self.device, dtype=self.dtype)
        self.owner._born(t)
        return t


def random_quantized(cls, config, quantization: str, dtype: torch.dtype, device: torch.device,
                     seed: int = 0, skip_modules=QUANT_SKIP_MODULES):
    """(bitsandbytes model of random weights, its RandomWeights): transformers' quantizing load
    (from_pretrained(None, state_dict=...), the path a model folder takes) over weights drawn one at
    a time as it reads them, so the model is never whole in `dtype`: Qwen2.5-VL-72B's 136.7 GiB of
    bf16 weights never exist, only its quantized ones (about 44 GiB in nf4). For benchmarks; the
    weights differ from a model built in `dtype` with the same seed (quantize_in_memory keeps
    those)."""
    check_device(quantization, device)
    if quantization == "fp8":                 # built in `dtype` on the device, then converted
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            torch.manual_seed(seed)
            with torch.device(device):
                model = cls(config)
        finally:
            torch.set_default_dtype(prev)
        model = model.to(device=device, dtype=dtype)      # as bench's bf16 build (buffers too)
        return after_load(model.eval().requires_grad_(False), "fp8"), None
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls(config).state_dict().items()}
    std = float(getattr(getattr(config, "text_config", config), "initializer_range", 0.02))
    weights = RandomWeights(shapes, device, dtype, std, seed)
    model = cls.from_pretrained(None, config=config, state_dict=weights, dtype=dtype,
                                quantization_config=bnb_config(quantization, dtype, skip_modules),
                                device_map=device_map_for(device))
    return model.eval().requires_grad_(False), weights
