"""Fused elementwise work of the language model's decoder layers (RMSNorm and the SiLU-gated MLP).

Why: profiled on an H100 (bench/profile_gpu.py, Qwen2.5-VL-7B architecture, one 14,150-token group
pass, torch 2.11, transformers 5.17): 427 ms, of which the matmuls 245 ms (~755 TFLOP/s, the
card's matmul rate), cuDNN attention 72 ms, and ~107 ms of unfused elementwise kernels (mul,
to-float32 copies, pow, mean, silu, add, cat: ~1,100 launches). transformers' RMSNorm makes five
passes over a float32 copy of the hidden states; the MLP writes silu(gate) and then reads it back
for the product with up.

What: `FusedText(text_model).install()` replaces the `forward` of each decoder RMSNorm (the layers'
two and the final one) and each SiLU-gated MLP *instance* with the same formula, run through
`torch.compile` (dynamic shapes: one graph serves every token count) on CUDA:

- RMSNorm: weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype): one kernel reading x
  once, transformers' exact formula (the float32 math and the cast before the weight kept);
- MLP: down_proj(silu(gate_proj(x)) * up_proj(x)) with silu * up as one kernel (the product is
  formed from the float32 silu, rounded once: bf16 rounding-level differences from eager, as for
  the compiled vision tower);
- rotary: the attention layers call their modeling module's global `apply_rotary_pos_emb`
  (transformers has no per-instance hook for it), so that global is wrapped once per process: the
  wrapper runs transformers' own function compiled (one kernel instead of the cat / neg / mul /
  add passes over q and k) only while *this* text model's forward runs (a context variable set by
  a pre-hook on the text model and reset by an always-called forward hook) and the tensors are on
  CUDA; any other caller, any other model, gets the original function.

Off CUDA, for small inputs (`min_elements`), with `enabled=False`, or once a compile has failed
(warned once), the replaced forwards run transformers' own formula eagerly (bit-identical:
tests/test_fused_text.py). `uninstall()`
puts the modules' own forwards back and removes the hooks (the rotary wrapper stays, inert).

Measured (H100, one 14,150-token group pass of the Qwen2.5-VL-7B architecture, random weights):
norm + MLP fused 422 -> 390 ms; end to end at 4096 frames 20.82 -> 19.63 s (bench gpu, same run).
"""
from __future__ import annotations

import contextvars
import inspect
import sys
import types
import warnings

import torch
import torch.nn.functional as F

__all__ = ["FusedText", "rms_norm", "silu_mul"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2 / Llama RMSNorm, as a function."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dt)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


_COMPILED: dict = {}
_STATE = {"failed": False}


def _compiled(fn):
    c = _COMPILED.get(fn)
    if c is None:
        c = _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return c


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("adapttoken_fused_text", default=None)
_ROTARY_WRAPPED: dict = {}          # modeling module name -> transformers' original function


def _wrap_rotary(attn) -> bool:
    """Wrap the global `apply_rotary_pos_emb` of `attn`'s modeling module (once per process)."""
    mod = sys.modules.get(type(attn).__module__)
    orig = getattr(mod, "apply_rotary_pos_emb", None)
    if mod is None or orig is None:
        return False
    if mod.__name__ in _ROTARY_WRAPPED:
        return True
    try:
        if "apply_rotary_pos_emb(" not in inspect.getsource(type(attn).forward):
            return False
    except (OSError, TypeError):
        return False

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        state = _ACTIVE.get()
        if state is not None and state.use(q):
            return state._run(orig, q, k, cos, sin, *args, **kwargs)
        return orig(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = orig
    _ROTARY_WRAPPED[mod.__name__] = orig
    mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def _is_rmsnorm(mod) -> bool:
    w = getattr(mod, "weight", None)
    return (type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon")
            and isinstance(w, torch.Tensor) and w.dim() == 1 and not hasattr(mod, "bias"))


def _is_silu_mlp(mod) -> bool:
    act = getattr(mod, "act_fn", None)
    return (all(isinstance(getattr(mod, n, None), torch.nn.Linear)
                for n in ("gate_proj", "up_proj", "down_proj"))
            and act is not None and type(act).__name__ in ("SiLU", "SiLUActivation"))


class FusedText:
    """Install / remove the fused forwards on one text model (see the module docstring).

    enabled: None (default) = fused on CUDA tensors, eager elsewhere; True = fused on any device
    (compiles for the CPU too; tests); False = eager everywhere (transformers' formula)."""

    def __init__(self, text_model: torch.nn.Module, enabled: bool | None = None):
        self.text_model = text_model
        self.enabled = enabled
        self.norms = [m for m in text_model.modules() if _is_rmsnorm(m)]
        self.mlps = [m for m in text_model.modules() if _is_silu_mlp(m)]
        self.attns = [m for m in text_model.modules() if type(m).__name__.endswith("Attention")
                      and hasattr(m, "q_proj")]
        self.rotary = False
        self.installed = False
        self._hooks: list = []
        self._tokens: list = []

    # Inputs smaller than this run eager even on CUDA: a short pass (a second question's ~110
    # tokens, a decode step) is launch-bound, and each compiled call adds Python time (guards);
    # 2^20 elements = 293 tokens of a 3584-wide hidden state.
    min_elements = 1 << 20

    def use(self, x: torch.Tensor) -> bool:
        if self.enabled is False or _STATE["failed"]:
            return False
        if self.enabled is None and x.numel() < self.min_elements:
            return False
        return bool(self.enabled) or x.is_cuda

    def _run(self, fn, *args, **kwargs):
        if self.use(args[0]):
            try:
                return _compiled(fn)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - fusing is an optimisation, eager is the product
                _STATE["failed"] = True
                warnings.warn(f"fused text kernels: torch.compile failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); running transformers' eager formula from now on",
                              RuntimeWarning)
        return fn(*args, **kwargs)

    def install(self) -> "FusedText":
        if self.installed:
            return self
        state = self

        def norm_forward(mod, hidden_states):
            return state._run(rms_norm, hidden_states, mod.weight, mod.variance_epsilon)

        def mlp_forward(mod, x):
            return mod.down_proj(state._run(silu_mul, mod.gate_proj(x), mod.up_proj(x)))

        for m in self.norms:
            m.forward = types.MethodType(norm_forward, m)
        for m in self.mlps:
            m.forward = types.MethodType(mlp_forward, m)
        self.rotary = bool(self.attns) and _wrap_rotary(self.attns[0])
        if self.rotary:
            def enter(module, args, kwargs=None):
                self._tokens.append(_ACTIVE.set(self))

            def leave(module, args, output):
                if self._tokens:
                    _ACTIVE.reset(self._tokens.pop())

            self._hooks = [self.text_model.register_forward_pre_hook(enter),
                           self.text_model.register_forward_hook(leave, always_call=True)]
        self.installed = True
        return self

    def uninstall(self) -> None:
        for m in self.norms + self.mlps:
            if "forward" in m.__dict__:
                del m.forward
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.installed = False
