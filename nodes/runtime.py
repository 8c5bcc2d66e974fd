"""The one owner of the model's life inside ComfyUI's memory manager, and the glue from the library's
Hooks to ComfyUI's progress bar, Cancel button, text streaming and error dialog.

The HF model is wrapped in a plain nn.Module (ModelPatcher assigns `.device`, which HF models refuse)
and handed to a ModelPatcher: `load_models_gpu` then makes room by offloading other models (for the
weights and the step's working memory, estimated by adapttoken.memory), and
/free or "Unload models" offload this one. Whenever the patcher detaches the weights, the video
feature cache (which lives on the same device) is dropped with them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import weakref
from dataclasses import dataclass

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy.patcher_extension import CallbacksMP

from .. import adapttoken as at
from ..adapttoken import memory
from ..adapttoken.models.loading import resolve_dtype
from ..adapttoken.models.quant import INSTALL as QUANT_INSTALL
from ..adapttoken.models.quant import BNB as BNB_QUANTIZATIONS
from ..adapttoken.models.quant import is_quantized, normalize as normalize_quantization
from .spec import BUNDLED_MODEL_NAME

LLM_FOLDER = "LLM"
log = logging.getLogger("adapttoken")


# -- model folders ---------------------------------------------------------------------------------

def bundled_model_dir() -> str:
    from ..adapttoken.defaults import BUNDLED_MODEL
    return str(BUNDLED_MODEL)


def model_folders() -> dict[str, str]:
    """Display name -> folder: subfolders (and org/name sub-subfolders) of every LLM model path
    that hold a config.json, plus the bundled demo model when it is installed."""
    found: dict[str, str] = {}
    try:
        roots = folder_paths.get_folder_paths(LLM_FOLDER)
    except KeyError:
        roots = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if os.path.isfile(os.path.join(d, "config.json")):
                found.setdefault(name, d)
            elif os.path.isdir(d):
                for sub in sorted(os.listdir(d)):
                    if os.path.isfile(os.path.join(d, sub, "config.json")):
                        found.setdefault(f"{name}/{sub}", os.path.join(d, sub))
    if os.path.isfile(os.path.join(bundled_model_dir(), "config.json")):
        found[BUNDLED_MODEL_NAME] = bundled_model_dir()
    return found


def model_names() -> list[str]:
    return list(model_folders())


def attention_options() -> list[str]:
    opts = ["sdpa", "eager"]
    if importlib.util.find_spec("flash_attn") is not None:
        opts.append("flash_attention_2")
    return opts


def model_dir(name: str) -> str:
    """The folder of a listed model, or a ModelLoadError that says where models go."""
    path = model_folders().get(name)
    if path is None:
        if name == BUNDLED_MODEL_NAME:
            raise at.ModelLoadError(f"the bundled demo model is not installed at {bundled_model_dir()}: "
                                    f"reinstall the pack, or pick a model from models/{LLM_FOLDER}")
        roots = ", ".join(_llm_roots()) or f"models/{LLM_FOLDER}"
        raise at.ModelLoadError(f"model {name!r} is not in {roots}: put the model folder (config.json "
                                f"+ .safetensors) there and refresh")
    return path


def _llm_roots() -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(LLM_FOLDER))
    except KeyError:
        return []


# -- the model inside ComfyUI's memory manager -----------------------------------------------------

class HFHolder(torch.nn.Module):
    """A plain module around the HF model, so that ModelPatcher may set `.device` on it."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model


def _device_key(device) -> str:
    """"cuda:0" for torch.device("cuda") (the current card), as tensors name their device."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


class WholeModelPatcher(comfy.model_patcher.ModelPatcher):
    """Loads and offloads the model as a whole (an HF model split across devices cannot run), and
    reports the pack's caches to ComfyUI's memory manager:

    - model_size() and loaded_size() add the bytes the model's video caches (features, prefix
      keys/values) hold on the load device right now, so ComfyUI's accounting of loaded models
      includes them. Caches in CPU memory (features stored there, the prefix host tier, Lite's
      frame stash) are not device memory and are not added on a GPU; they go with the weights.
    - partially_unload() is ComfyUI asking this model for `memory_to_free` bytes: the caches on
      the load device go first (the weights stay); when that is not enough ComfyUI offloads the
      weights too, and ON_DETACH (see load) drops every cache."""

    owner = None                 # weakref to the ComfyModel (set by load())
    _weights_only = 0            # > 0 inside ModelPatcher's own loading code: sizes mean weights

    def cache_bytes(self) -> int:
        m = self.owner() if self.owner is not None else None
        if m is None:
            return 0
        return int(m.held_bytes().get(_device_key(self.load_device), 0))

    def model_size(self):
        return super().model_size() + (0 if self._weights_only else self.cache_bytes())

    def loaded_size(self):
        return super().loaded_size() + (0 if self._weights_only else self.cache_bytes())

    def load(self, *args, **kwargs):
        self._weights_only += 1
        try:
            return super().load(*args, **kwargs)
        finally:
            self._weights_only -= 1

    def partially_load(self, *args, **kwargs):
        self._weights_only += 1
        try:
            return super().partially_load(*args, **kwargs)
        finally:
            self._weights_only -= 1

    def partially_unload(self, device_to=None, memory_to_free=0, *args, **kwargs):
        m = self.owner() if self.owner is not None else None
        if m is None:
            return 0
        freed = m.free_memory(self.load_device)
        if freed:
            log.info("AdaptToken: freed %.1f MiB of video caches for ComfyUI", freed / 2 ** 20)
        return freed


@dataclass(eq=False)
class ComfyModel(at.Model):
    """An adapttoken.Model whose weights ComfyUI's memory manager moves (see module doc)."""
    patcher: object = None
    keep_loaded: bool = True
    path: str = ""

    def ensure_loaded(self, memory_required: int = 0) -> None:
        """Weights on the compute device before any pass, with `memory_required` bytes of working
        memory left free besides them (adapttoken.memory's estimate of the step): ComfyUI
        offloads other models until both fit. A quantized model is already there (see load)."""
        mm.load_models_gpu([self.patcher], memory_required=int(memory_required))
        if not self.quantized:
            self.adapter.model.to(self.patcher.load_device)   # buffers the patcher does not move

    @property
    def quantized(self) -> bool:
        return is_quantized(self.adapter.model)

    def offload(self) -> None:
        """Weights back to the offload device, video features dropped, cache emptied."""
        for lm in list(mm.current_loaded_models):
            if lm.model is self.patcher:
                lm.model_unload()
                mm.current_loaded_models.remove(lm)
        self.clear_cache()
        mm.soft_empty_cache()


_OWNERS: dict[int, weakref.ref] = {}


def _estimate(what: str, fn, *args) -> int:
    """An estimate never stops a run: a config it cannot read gives 0 (ComfyUI's own minimum)."""
    try:
        return int(fn(*args))
    except Exception as e:  # noqa: BLE001
        log.warning("AdaptToken: no working-memory estimate for %s (%s: %s)", what, type(e).__name__, e)
        return 0


def group_step_memory(model: ComfyModel, ranked) -> int:
    """Working memory of Budget Allocate's group passes and vision chunks on the load device."""
    return _estimate("the group passes", memory.group_step_bytes, ranked, model.patcher.load_device)


def answer_memory(model: ComfyModel, selection, max_new_tokens: int) -> int:
    """Working memory of MLLM Answer (prefill, KV cache, any vision chunk) on the load device."""
    return _estimate("the answer", memory.answer_step_bytes, selection, max_new_tokens,
                     model.patcher.load_device)


def owner_of(adapter) -> ComfyModel | None:
    """The ComfyModel that holds `adapter` (a Selection knows its adapter, not its Model)."""
    ref = _OWNERS.get(id(adapter))
    m = ref() if ref is not None else None
    return m if m is not None and m.adapter is adapter else None


def _compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return resolve_dtype(dtype, device)
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def quantization_problem(quantization: str) -> str | None:
    """Why `quantization` cannot be used here (unknown value, bitsandbytes missing, fp8 on a GPU
    without FP8 matmuls), or None."""
    try:
        q = normalize_quantization(quantization)
    except at.AdaptTokenError as e:
        return str(e)
    if q in BNB_QUANTIZATIONS and (importlib.util.find_spec("bitsandbytes") is None
                                   or importlib.util.find_spec("accelerate") is None):
        return f"quantization {q!r} needs the bitsandbytes and accelerate packages: {QUANT_INSTALL}"
    if q == "fp8":
        from ..adapttoken.models.fp8 import check_device
        try:
            check_device(mm.get_torch_device())
        except at.AdaptTokenError as e:
            return str(e)
    return None


def load(name: str, dtype: str = "auto", attention: str = "sdpa", keep_loaded: bool = True,
         quantization: str = "none") -> ComfyModel:
    """Load a listed model onto the offload device and register it with ComfyUI.

    Quantized (bitsandbytes) weights are never moved between devices: such a model is loaded
    straight onto the compute device and its patcher's offload device is that same device, so
    ComfyUI's load and unload move nothing; unloading it (or keep_loaded off) drops its video
    caches, and its weights go when the node's output is released."""
    path = model_dir(name)
    problem = quantization_problem(quantization)
    if problem:
        raise at.InputError(problem)
    q = normalize_quantization(quantization)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    if q:
        offload_device = load_device
    lib = at.load_model(path, dtype=_compute_dtype(dtype, load_device), device=offload_device,
                        attn_implementation=attention, quantization=q)
    patcher = WholeModelPatcher(HFHolder(lib.adapter.model), load_device=load_device,
                                offload_device=offload_device)
    model = ComfyModel(lib.adapter, name=name, patcher=patcher, keep_loaded=keep_loaded, path=path)
    ref = weakref.ref(model)
    for key in [k for k, r in _OWNERS.items() if r() is None]:
        del _OWNERS[key]
    _OWNERS[id(lib.adapter)] = ref

    def drop_features(_patcher, unpatch_all=True):
        # ON_DETACH also fires, with unpatch_all=False, each time load_models_gpu re-registers
        # a model that stays loaded; only a real unload moves the weights (and drops features).
        m = ref()
        if unpatch_all and m is not None:
            m.clear_cache()
            log.info("AdaptToken: %s unloaded; its video features were dropped", m.name)

    patcher.add_callback(CallbacksMP.ON_DETACH, drop_features)
    patcher.owner = ref
    return model


def weights_fingerprint(name: str):
    """Changes when the model's files change (so a replaced model is reloaded)."""
    path = model_folders().get(name)
    if path is None:
        return name
    return name, tuple(sorted((f, os.stat(os.path.join(path, f)).st_mtime_ns)
                              for f in os.listdir(path) if f.endswith((".json", ".safetensors"))))


# -- hooks and errors ------------------------------------------------------------------------------

def hooks(node_id: str | None = None) -> at.Hooks:
    """Library hooks: progress -> ComfyUI's progress bar, cancelled -> the Cancel button,
    on_text -> text streamed onto the node `node_id`."""
    bars: dict[str, comfy.utils.ProgressBar] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.setdefault(stage, comfy.utils.ProgressBar(total))
        bar.update_absolute(done, total)

    def on_text(text: str) -> None:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, node_id)

    return at.Hooks(progress=progress, cancelled=mm.processing_interrupted,
                    on_text=on_text if node_id is not None else None)


def _give_back(model: at.Model | None) -> None:
    """After a failed or cancelled step: a model loaded with keep_loaded off goes back to the
    offload device (as after an answer), then the allocator's cache is emptied."""
    if isinstance(model, ComfyModel) and not model.keep_loaded:
        model.offload()
    mm.soft_empty_cache()


@contextlib.contextmanager
def comfy_errors(model: at.Model | None = None):
    """Library errors -> ComfyUI: Cancel becomes InterruptProcessingException (reported as
    interrupted), a user-facing AdaptTokenError a plain ValueError with the same message, running
    out of device memory anywhere (torch.OutOfMemoryError) a one-line ValueError naming what to
    lower, with the model's caches freed; and GPU memory is given back whatever went wrong (the
    weights too when keep_loaded is off)."""
    try:
        yield
    except at.Cancelled:
        _give_back(model)
        mm.interrupt_current_processing(False)
        raise mm.InterruptProcessingException() from None
    except at.AdaptTokenError as e:
        if isinstance(e, at.OutOfMemory) and model is not None:
            model.clear_cache()
        _give_back(model)
        raise ValueError(str(e)) from None
    except BaseException as e:
        if not memory.is_out_of_memory(e):
            _give_back(model)
            raise
        # the failed pass's tensors (in the traceback's frames) and the caches go; a ValueError
        # so that ComfyUI shows the one line as it is
        memory.free_after_oom(e, model.clear_cache if model is not None else None)
        dev = getattr(getattr(model, "patcher", None), "load_device", None)
        msg = memory.oom_message(None, dev)
        del e
        _give_back(model)
        raise ValueError(msg) from None


def cache_report(model: at.Model | None) -> dict:
    """What ComfyUI is told about the model's caches: bytes held per device, the part on the load
    device, and the model_size()/loaded_size() ComfyUI reads."""
    if not isinstance(model, ComfyModel):
        return {}
    return {"held_bytes": model.held_bytes(), "cache_bytes": model.patcher.cache_bytes(),
            "model_size": model.patcher.model_size(), "loaded_size": model.patcher.loaded_size()}
