"""Compiled RMSNorms and SiLU-gated MLPs in the language model's decoder layers (nn.Module.compile).

Why: profiled on an H100 (bench/profile_gpu.py, Qwen2.5-VL-7B architecture, one 14,150-token group
pass, torch 2.11, transformers 5.17): 427 ms, of which the matmuls 245 ms (~755 TFLOP/s, the
card's matmul rate), cuDNN attention 72 ms, and ~107 ms of unfused elementwise kernels (mul,
to-float32 copies, pow, mean, silu, add, cat: ~1,100 launches). transformers' RMSNorm makes five
passes over a float32 copy of the hidden states; the MLP writes silu(gate) and then reads it back
for the product with up.

What: `FusedText(text_model).install()` gives each decoder RMSNorm (the layers' two and the final
one) and each SiLU-gated MLP a compiled call, the way `nn.Module.compile` does it: the module's own
`_call_impl` through `torch.compile(dynamic=True)` (one graph per module type serves every token
count and every layer), stored where `nn.Module.compile` stores it, `module._compiled_call_impl`,
which `Module.__call__` runs instead of the eager call. transformers' code is not touched: no
module global and no method is reassigned, no instance gets a `forward` of its own; the modules
run transformers' own forward, compiled or eager.

What we store there is a small router of ours (`_Route`) rather than the bare compiled function,
because three things must stay eager, decided per call:

- short inputs (`min_elements`): a second question's ~110-token suffix pass and the decode steps of
  generation are launch-bound; each compiled call adds Python time (guards), measured as +35 ms per
  suffix pass when everything was compiled (docs/PERF_NOTES.md item 13);
- a module that carries hooks at call time (its own, its submodules' or global ones): dynamo may
  not see hooks registered after a graph was compiled (`skip_nnmodule_hook_guards`, on by default:
  an empty hook dict is not guarded; measured: a submodule's pre-hook added later silently did not
  run), so a compiled call could skip them. The eager call runs them. Tensor parallel (transformers'
  tp_plan) puts its hooks on the Linear layers, so its MLPs run eager by this rule alone (and
  loading a model tensor-parallel sets `fuse_text = False`); group-parallel copies under torchrun
  (whole models) keep the compiled path;
- `enabled=False`, inputs off CUDA with `enabled=None`, and every call after a failed compile
  (warned once): `module._call_impl`, i.e. exactly transformers' eager forward and hooks.

Why not compile whole decoder layers (measured on the CPU with torch 2.14 and transformers 5.24,
tests/test_fused_text.py keeps the facts): (1) with a key/value cache (our prefix store runs every
group pass's prefix through a DynamicCache) the layer's graph guards on the cache's state and the
layer index: one recompile per layer, and after torch's recompile limit (8) the remaining layers
run eager, with a warning; (2) the attention probe registers a pre-hook on one layer's self_attn
per pass, and a compiled layer skipped it (above; the layer's own pre-hooks, Cancel's, did run). So the attention modules
(projections, transformers' `apply_rotary_pos_emb`, the cache update, sdpa) stay eager; the rotary
products are no longer fused, as they were when this module wrapped transformers' module-global
`apply_rotary_pos_emb` (removed: reassigning another library's globals is not allowed here).

Numerics: the compiled RMSNorm keeps transformers' float32 math and cast before the weight (the
graph is transformers' code), with bf16 rounding-level differences from eager where inductor keeps
intermediates in float32 (the MLP's silu * up product), as for the compiled vision tower.
`uninstall()` removes the routers (the modules' plain eager call again).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["FusedText", "FusedTextAdapter", "rms_norm", "silu_mul"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2 / Llama RMSNorm, as a function (reference for tests)."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dt)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


_STATE = {"failed": False}


def _compiled(module: torch.nn.Module):
    """What `module.compile(dynamic=True)` stores: the module's own call, compiled."""
    return torch.compile(module._call_impl, dynamic=True)


def _has_hooks(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as mm
    if (mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
            or mm._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in module.modules())


def _is_rmsnorm(mod) -> bool:
    w = getattr(mod, "weight", None)
    return (type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon")
            and isinstance(w, torch.Tensor) and w.dim() == 1 and not hasattr(mod, "bias"))


def _is_silu_mlp(mod) -> bool:
    act = getattr(mod, "act_fn", None)
    return (all(isinstance(getattr(mod, n, None), torch.nn.Linear)
                for n in ("gate_proj", "up_proj", "down_proj"))
            and act is not None and type(act).__name__ in ("SiLU", "SiLUActivation"))


class _Route:
    """The compiled call of one module (stored as its `_compiled_call_impl`): the compiled graph or
    the module's own eager call, chosen per call by the owning FusedText."""

    def __init__(self, owner: "FusedText", module: torch.nn.Module):
        self.owner, self.module, self.compiled = owner, module, None

    def __call__(self, *args, **kwargs):
        m, owner = self.module, self.owner
        x = args[0] if args else next(iter(kwargs.values()), None)
        if (isinstance(x, torch.Tensor) and owner.use(x) and not torch.compiler.is_compiling()
                and not _has_hooks(m)):
            try:
                if self.compiled is None:
                    self.compiled = _compiled(m)
                out = self.compiled(*args, **kwargs)
                owner.compiled_calls += 1
                return out
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - compiling is an optimisation, eager is the product
                _STATE["failed"] = True
                warnings.warn(f"compiled text modules: torch.compile failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); running transformers' eager forward from now on",
                              RuntimeWarning)
        return m._call_impl(*args, **kwargs)


class FusedText:
    """Install / remove the compiled RMSNorm and MLP calls of one text model (module docstring).

    enabled: None (default) = compiled on CUDA tensors, eager elsewhere; True = compiled on any
    device (compiles for the CPU too; tests); False = eager everywhere (transformers' forward)."""

    # Inputs smaller than this run eager even on CUDA: a short pass (a second question's ~110
    # tokens, a decode step) is launch-bound, and each compiled call adds Python time (guards);
    # 2^20 elements = 293 tokens of a 3584-wide hidden state.
    min_elements = 1 << 20

    def __init__(self, text_model: torch.nn.Module, enabled: bool | None = None):
        self.text_model = text_model
        self.enabled = enabled
        self.norms = [m for m in text_model.modules() if _is_rmsnorm(m)]
        self.mlps = [m for m in text_model.modules() if _is_silu_mlp(m)]
        self.installed = False
        self.compiled_calls = 0          # calls that ran a compiled graph (tests, benchmarks)

    def use(self, x: torch.Tensor) -> bool:
        if self.enabled is False or _STATE["failed"]:
            return False
        if self.enabled is None and x.numel() < self.min_elements:
            return False
        return bool(self.enabled) or x.is_cuda

    def install(self) -> "FusedText":
        if self.installed:
            return self
        for m in self.norms + self.mlps:
            if m._compiled_call_impl is None:       # a module compiled by someone else stays so
                m._compiled_call_impl = _Route(self, m)
        self.installed = True
        return self

    def uninstall(self) -> None:
        for m in self.norms + self.mlps:
            route = m._compiled_call_impl
            if isinstance(route, _Route) and route.owner is self:
                m._compiled_call_impl = None
        self.installed = False


class FusedTextAdapter:
    """The adapter side, shared by every family (Qwen2.5-VL, and through FamilyAdapter Qwen3-VL,
    InternVL, LLaVA-OneVision): `install_fused_text()` once the model is set, then
    `adapter.fuse_text` reads and sets FusedText.enabled (None: compiled on CUDA; False: eager
    everywhere, which tensor parallel sets; True: compiled on any device)."""
    fused_text: FusedText | None = None

    def install_fused_text(self) -> None:
        self.fused_text = FusedText(self.text_model).install()

    @property
    def fuse_text(self) -> bool | None:
        """None (default): fused norm/MLP kernels on CUDA, transformers' eager formula elsewhere;
        False: eager everywhere; True: fused on any device (see fused_text.py)."""
        return self.fused_text.enabled if self.fused_text is not None else False

    @fuse_text.setter
    def fuse_text(self, value: bool | None) -> None:
        if self.fused_text is not None:
            self.fused_text.enabled = value
