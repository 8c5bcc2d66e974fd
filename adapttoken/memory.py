"""Working memory of the method's steps on the compute device, estimated from the model's config.

The weights are counted by whoever loads them (ComfyUI's ModelPatcher); these are the bytes a step
needs *besides* them: the temporaries of one decoder pass over a group (or over the kept tokens for
the answer, plus its KV cache), the temporaries of the vision tower on one chunk of slices, and the
video features kept on the device, and the NVDEC decoder lanes' surfaces while they decode
(nvdec_bytes: outside torch's allocator, so torch's peak never shows them). Upper-bound style
estimates (every layer's largest temporaries alive at once, float32 where the code upcasts),
checked against the measured peak of a real pass in tests/test_memory_estimate.py; nodes/runtime.py
hands them to ComfyUI so it frees other models first.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import OutOfMemory

ATTENTION_EAGER = "eager"
# Text a family puts around each slice's visual tokens (Qwen3-VL's timestamps, InternVL's
# "Frame i: <img>...</img>"): at most this many tokens per slice in the families we support.
WRAPPER_TOKENS_PER_SLICE = 8


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _text_config(adapter):
    cfg = adapter.model.config
    get = getattr(cfg, "get_text_config", None)
    return get() if get is not None else cfg


def _attention(adapter) -> str:
    return getattr(adapter.model.config, "_attn_implementation", None) or "sdpa"


def llm_pass_bytes(adapter, tokens: int, query_tokens: int = 0, new_tokens: int = 0) -> int:
    """One decoder pass over `tokens` tokens: a group pass (probe over `query_tokens` question rows,
    no KV cache) or, with `new_tokens`, the answer's prefill and decoding (KV cache of every layer)."""
    t = _text_config(adapter)
    b = _bytes(adapter.dtype)
    H, I = int(t.hidden_size), int(getattr(t, "intermediate_size", 4 * t.hidden_size))
    heads = int(t.num_attention_heads)
    kv_heads = int(getattr(t, "num_key_value_heads", None) or heads)
    hd = int(getattr(t, "head_dim", None) or H // heads)
    vocab, layers = int(t.vocab_size), int(t.num_hidden_layers)
    n = int(tokens)
    # inputs_embeds, residual, attention output and o_proj; q, k, v and their rotary temporaries;
    # the MLP's gate, up and act(gate)*up; RMSNorm's float32 temporaries: one layer's worth at a time
    per_token = (4 * H + 3 * (heads * hd + 2 * kv_heads * hd) + 3 * I) * b + 3 * H * 4
    total = n * per_token
    total += n * 3 * 8                                   # position ids (3 rows, int64)
    if _attention(adapter) == ATTENTION_EAGER:
        total += 2 * heads * n * n * b                   # scores and softmax of one layer
    else:
        total += n * n                                   # a boolean causal mask, if one is built
    if query_tokens:                                     # models/probe.py: float32 scores
        total += 3 * heads * int(query_tokens) * n * 4 + 2 * n * kv_heads * hd * 4
    total += 2 * vocab * 4                               # last-position logits, float32
    if new_tokens:
        total += 2 * layers * kv_heads * hd * (n + int(new_tokens)) * b   # KV cache
        total += int(new_tokens) * vocab * 4             # each step's logits, kept for entropy
    return int(total)


def vision_chunk_bytes(adapter, slices: int, resized: tuple[int, int],
                       source: tuple[int, int] | None = None) -> int:
    """The vision tower on `slices` slices of frames decoded at `source` (height, width) and
    resized to `resized`: the frames, preprocessed pixels, one block's temporaries over every
    patch, and the chunk's output features."""
    v = getattr(adapter.model.config, "vision_config", None)
    if v is None:
        return 0
    b = _bytes(adapter.dtype)
    h, w = int(resized[0]), int(resized[1])
    p = getattr(v, "patch_size", 14)
    p = int(p[0] if isinstance(p, (list, tuple)) else p)              # InternVL: [14, 14]
    tp = int(getattr(v, "temporal_patch_size", None) or 1)
    Hv = int(getattr(v, "hidden_size", None) or getattr(v, "embed_dim"))
    Iv = int(getattr(v, "intermediate_size", None) or 4 * Hv)
    heads = int(getattr(v, "num_heads", None) or getattr(v, "num_attention_heads", 1))
    frames = int(slices) * adapter.frames_per_slice
    per_frame = max(1, (h // p) * (w // p))
    patches = max(1, frames // tp) * per_frame
    sh, sw = source if source is not None else (h, w)
    total = frames * int(sh) * int(sw) * 3 * 2           # decoded uint8 frames, and their copy
    # resized uint8 frames and float32 copies (convert, patchify, cat)
    total += frames * h * w * 3 * (1 + 3 * 4)
    total += patches * 3 * tp * p * p * b                # the patch rows fed to the tower
    total += patches * (4 * Hv + 3 * Iv) * b            # one block over every patch
    total += patches * 2 * 4 * 8                         # rotary tables, float32 (cos, sin)
    if _attention(adapter) == ATTENTION_EAGER:
        total += 2 * heads * per_frame * per_frame * b * max(1, frames // tp)
    else:
        total += per_frame * per_frame * max(1, frames // tp)   # block-diagonal mask, if built
    total += int(slices) * _feature_bytes_per_slice(adapter, resized)
    return int(total)


def _feature_bytes_per_slice(adapter, resized: tuple[int, int]) -> int:
    rows, cols = adapter.token_grid(tuple(resized))
    t = _text_config(adapter)
    v = getattr(adapter.model.config, "vision_config", None)
    levels = 1 + len(getattr(v, "deepstack_visual_indexes", None) or ())   # Qwen3-VL's extras
    return int(rows * cols * int(t.hidden_size) * levels * _bytes(adapter.dtype))


def stored_features_bytes(features, device: torch.device | None = None) -> int:
    """Bytes the video's features take on the compute device `device` (default: where the model
    is now; 0 where they go to CPU memory off a CPU device), following SliceFeatures' own rule."""
    dev = torch.device(device) if device is not None else features.adapter.device
    if features.feature_device == "cpu":
        return 0
    total = features.num_slices * _feature_bytes_per_slice(features.adapter, features.resized)
    if features.feature_device == "gpu" or dev.type != "cuda":
        return total
    return total if total <= features.gpu_feature_limit(dev) else 0


# NVDEC (features.hw_decode): each decoder lane's FFmpeg CUDA decoder allocates its surface pool
# with the CUDA driver, outside torch's allocator. Measured on an H200 (bench gpu, 4K H.264, 4096
# frames, 8 lanes, docs/bench_gpu_sources/nvdec_4k_4096): 3.35 GiB outside torch with NVDEC against
# 0.69 GiB with CPU lanes in the same run, 2.66 GiB for 8 lanes = 28.7 NV12 frames of 3840x2160
# per lane (the H.264 reference frames, FFmpeg's extra surfaces and the frames in flight).
NVDEC_SURFACES_PER_LANE = 29


def nvdec_bytes(features, device: torch.device | None = None) -> int:
    """Bytes the NVDEC decoder lanes take on the compute device `device` outside torch's allocator:
    0 unless the features would decode on NVDEC there (hw_decode, a CUDA device, 4:2:0 planes
    handed over: SliceFeatures._yuv's rule judged for `device`, since ComfyUI asks before it loads
    the model onto it); else lanes x NVDEC_SURFACES_PER_LANE x one NV12 frame of the file's size."""
    dev = torch.device(device) if device is not None else features.adapter.device
    if not getattr(features, "hw_decode", False) or dev.type != "cuda":
        return 0
    if features.yuv_handover is False or getattr(features.video, "yuv420", None) is None:
        return 0
    info = features.video.info
    frame = int(info.height) * int(info.width) * 3 // 2
    return int(max(0, int(features.decode_workers)) * NVDEC_SURFACES_PER_LANE * frame)


def _prompt_tokens(prompt) -> tuple[int, int]:
    return int(len(prompt.prefix_ids)), int(len(prompt.suffix_ids))


def _chunk_bytes(features, slices) -> int:
    """The vision chunk for those of `slices` not encoded (nor on disk) yet; 0 when all are."""
    missing = getattr(features, "_missing", None)
    n = len(missing(slices)) if missing is not None else len(slices)
    if not n:
        return 0
    info = features.video.info
    per_chunk = getattr(features, "encode_chunk_slices", None)
    cs = per_chunk() if per_chunk is not None else features.chunk_slices
    return vision_chunk_bytes(features.adapter, min(cs, n), features.resized,
                              (info.height, info.width))


def group_step_bytes(ranked, device: torch.device | None = None) -> int:
    """Budget Allocate: the largest group pass or vision chunk, plus the stored features."""
    f = ranked.features
    pre, suf = _prompt_tokens(ranked.prompt)
    largest = max((len(s) for s in ranked.groups.slices), default=0)
    tokens = pre + largest * (f.tokens_per_slice + WRAPPER_TOKENS_PER_SLICE) + suf
    group = llm_pass_bytes(f.adapter, tokens, query_tokens=suf)
    chunk = _chunk_bytes(f, np.arange(f.num_slices))
    decoder = nvdec_bytes(f, device) if chunk else 0
    return int(max(group, chunk) + decoder + stored_features_bytes(f, device))


def answer_step_bytes(selection, max_new_tokens: int, device: torch.device | None = None) -> int:
    """MLLM Answer: the prefill and decoding over the kept tokens or the vision chunks of kept
    slices not encoded yet (the uniform baseline encodes here), plus the stored features."""
    f = selection.features
    pre, suf = _prompt_tokens(selection.prompt)
    kept = int(len(selection.gids))
    slices = np.unique(selection.gids.cpu().numpy() // f.tokens_per_slice)
    tokens = pre + kept + len(slices) * WRAPPER_TOKENS_PER_SLICE + suf
    total = llm_pass_bytes(f.adapter, tokens, new_tokens=max_new_tokens)
    total += kept * _feature_bytes_per_slice(f.adapter, f.resized) // max(1, f.tokens_per_slice)
    if kept:
        chunk = _chunk_bytes(f, slices)
        total = max(total, chunk + (nvdec_bytes(f, device) if chunk else 0))
    return int(total + stored_features_bytes(f, device))


# -- out of memory ----------------------------------------------------------------------------------

LOWER = "the frames (num_frames), the token budget, max_pixels or the group size"


def oom_message(settings: dict | None = None, device: torch.device | None = None) -> str:
    """One line: what ran out, where, and what to lower (with the values in `settings`, e.g.
    {"num_frames": 1024, "budget": 7040, "max_pixels": 172480, "group_size": 64})."""
    where = ""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        from .kv_cache import device_memory_budget
        try:
            used = torch.cuda.memory_reserved(dev) / 2 ** 30
            where = f" on {dev} ({used:.1f} of {device_memory_budget(dev) / 2 ** 30:.1f} GiB reserved)"
        except Exception:  # noqa: BLE001 - a figure is a nicety
            where = f" on {dev}"
    lower = LOWER
    if settings:
        names = {"num_frames": "the frames", "budget": "the token budget",
                 "max_pixels": "max_pixels", "group_size": "the group size"}
        parts = [f"{names.get(k, k)} ({v})" for k, v in settings.items() if v is not None]
        if parts:
            lower = ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]
    return (f"out of GPU memory{where}: lower {lower}, or load the model with a smaller dtype; "
            f"the video caches were freed")


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
        and not isinstance(e, OutOfMemory))


def free_after_oom(e: BaseException, free=None) -> None:
    """Let go of what an out-of-memory error holds: the tensors in its traceback's frames, the
    caches (`free()`), and the allocator's cached blocks."""
    import traceback
    traceback.clear_frames(e.__traceback__)
    if free is not None:
        free()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class out_of_memory:  # noqa: N801 - used as a context manager, like a function
    """`with out_of_memory(free, settings, device):` turns a torch.OutOfMemoryError (or a "CUDA out
    of memory" RuntimeError) raised inside into errors.OutOfMemory with a one-line message naming
    what to lower, after calling `free()` (drop the caches) and emptying the allocator's cache."""

    def __init__(self, free=None, settings: dict | None = None, device=None):
        self.free, self.settings, self.device = free, settings, device

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is None or not is_out_of_memory(e):
            return False
        free_after_oom(e, self.free)
        msg = oom_message(self.settings, self.device)
        del e, tb
        raise OutOfMemory(msg) from None
