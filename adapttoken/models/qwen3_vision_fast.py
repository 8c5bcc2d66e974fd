"""Fast forward of the Qwen3-VL vision tower (``model.model.visual``) for video features.

``fast_video_features(visual, pixel_values, grid_thw)`` returns what
``model.model.get_video_features(pixel_values, grid_thw)`` returns, as ``(merged, [deepstack levels])``
concatenated over the videos, computed with the module's own weights and submodules (patch
embedding weights, learned position table, rotary, blocks' norms/qkv/proj/MLP, the merger and the
deepstack mergers) and transformers' own helpers for the position table's interpolation, the rotary
positions and the attention segments (``transformers.vision_utils``, the functions the tower's
forward calls).

What changes is the attention. Qwen3-VL's tower attends within each frame (each temporal patch of
each video: ``cu_seqlens``), and transformers' sdpa path splits q/k/v per segment and calls sdpa once
per segment in a Python loop: 2,048 calls per block at 4,096 frames, 27 blocks. Here the tokens stay
in transformers' order (so the 2x2 mergers see the same rows) and each block makes one batched sdpa
call per run of equal-length segments (one call for a video of one frame size), via
``qwen_vision_fast._segment_attention``. On CUDA the per-block code before and after the attention
runs through ``torch.compile`` (LayerNorms, rotary, GELU and residuals fused), as for Qwen2.5-VL, and
the patch embedding (a Conv3d whose kernel equals its stride) is one matmul plus its bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .qwen_vision_fast import (_attn_in, _attn_out_mlp, _compiled, _rotary, _segment_attention,
                               run_compiled_or_eager)

__all__ = ["fast_video_features", "is_supported"]


def _helpers():
    """transformers' own helpers of the tower's forward (5.17+), or None."""
    try:
        from transformers import vision_utils as vu
        return (vu.get_vision_interpolation_indices_and_weights, vu.get_vision_position_ids,
                vu.get_vision_attention_seqlens)
    except (ImportError, AttributeError):
        return None


def _block_ok(blk) -> bool:
    attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    if attn is None or mlp is None:
        return False
    if not all(hasattr(attn, n) for n in ("qkv", "proj", "num_heads", "head_dim", "scaling")):
        return False
    if not all(hasattr(mlp, n) for n in ("linear_fc1", "linear_fc2", "act_fn")):
        return False
    if not all(isinstance(getattr(blk, n, None), torch.nn.LayerNorm) for n in ("norm1", "norm2")):
        return False
    qkv = attn.qkv
    return (isinstance(qkv, torch.nn.Linear) and qkv.out_features == 3 * qkv.in_features
            and attn.num_heads * attn.head_dim == qkv.in_features)


def is_supported(visual) -> bool:
    """True when `visual` is the transformers 5.x Qwen3-VL vision tower this module knows."""
    try:
        if type(visual).__name__ not in ("Qwen3VLVisionModel", "Qwen3VLMoeVisionModel"):
            return False
        if _helpers() is None:
            return False
        for name in ("spatial_merge_size", "patch_embed", "pos_embed", "num_grid_per_side",
                     "rotary_pos_emb", "blocks", "merger", "deepstack_visual_indexes",
                     "deepstack_merger_list", "interpolation_mode", "interpolation_align_corners"):
            if not hasattr(visual, name):
                return False
        proj = getattr(visual.patch_embed, "proj", None)
        if not isinstance(proj, torch.nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride):
            return False
        if len(visual.blocks) == 0 or not all(_block_ok(b) for b in visual.blocks):
            return False
        return len(visual.deepstack_merger_list) == len(visual.deepstack_visual_indexes)
    except Exception:  # pragma: no cover - anything odd means "not the tower we know"
        return False


def _patch_embed(visual, pixel_values, matmul):
    proj = visual.patch_embed.proj
    w = proj.weight                                       # [D, C, T, P, P]
    pv = pixel_values.to(device=w.device, dtype=w.dtype)
    if matmul is None:
        matmul = w.device.type == "cuda"
    if matmul:  # kernel == stride: one matmul over each patch row, plus the bias
        return F.linear(pv.reshape(pv.shape[0], -1), w.reshape(w.shape[0], -1), proj.bias)
    return visual.patch_embed(pv)


def _groups(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, count, length) runs of equal-length consecutive attention segments."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    out, start = [], 0
    for L in lengths:
        if L == 0:
            continue
        if out and out[-1][2] == L:
            s, n, _ = out[-1]
            out[-1] = (s, n + 1, L)
        else:
            out.append((start, 1, L))
        start += L
    return out


def _block(blk, x, cos, sin, groups, compile):
    """One block: the same per-block functions as the Qwen2.5-VL tower (norm1, qkv, rotary; then
    proj, norm2, MLP), compiled under their own names (this tower's modules differ)."""
    attn = blk.attn
    attn_in = _compiled("q3_attn_in", _attn_in) if compile else _attn_in
    qk, v = attn_in(blk, x, cos, sin)
    o = _segment_attention(qk, v, groups, attn.num_heads, attn.head_dim, attn.scaling)
    return (_compiled("q3_attn_out_mlp", _attn_out_mlp) if compile else _attn_out_mlp)(blk, x, o)


def _forward(visual, pixel_values, grid_thw, compile, patch_matmul):
    interp, position_ids, seqlens = _helpers()
    kw = {}
    idx, wts = interp(grid_thw, num_grid_per_side=visual.num_grid_per_side,
                      mode=visual.interpolation_mode, align_corners=visual.interpolation_align_corners,
                      spatial_merge_size=visual.spatial_merge_size, kwargs=kw)
    pos = position_ids(grid_thw, visual.spatial_merge_size, kwargs=kw)
    cu, _ = seqlens(grid_thw, visual.config, kwargs=kw)
    x = _patch_embed(visual, pixel_values, patch_matmul)
    if x.shape[0] != int(cu[-1]):
        raise ValueError(f"pixel_values has {x.shape[0]} rows but grid_thw describes {int(cu[-1])} patches")
    pos_embeds = (visual.pos_embed(idx) * wts[:, :, None]).sum(1)
    x = x + pos_embeds.to(x.dtype)
    cos, sin, _, _ = _rotary(visual, x, pos)                  # [N, 1, d] float32
    groups = _groups(cu)
    deep = []
    levels = [int(i) for i in visual.deepstack_visual_indexes]
    for i, blk in enumerate(visual.blocks):
        x = _block(blk, x, cos, sin, groups, compile)
        if i in levels:
            deep.append(visual.deepstack_merger_list[levels.index(i)](x))
    return visual.merger(x), deep


def fast_video_features(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        *, compile: bool | None = None, patch_matmul: bool | None = None):
    """``(merged [sum_v t*h*w/merge^2, out_hidden], [deepstack level features, same rows])``, equal to
    ``get_video_features(...)``'s ``pooler_output`` and ``deepstack_features`` concatenated over videos.

    ``compile``: None (default) = on for CUDA, off elsewhere, and off for good after a failed compile
    (with a warning); True = compile (raises if it fails); False = eager. Runs under no_grad.
    Raises ValueError when ``visual`` is not a tower this module supports (see ``is_supported``)."""
    if not is_supported(visual):
        raise ValueError(f"{type(visual).__name__} is not a Qwen3-VL vision tower that "
                         "fast_video_features supports; use model.model.get_video_features instead")
    return run_compiled_or_eager(lambda c: _forward(visual, pixel_values, grid_thw, c, patch_matmul),
                                 compile, visual.patch_embed.proj.weight.device, "q3_failed",
                                 "qwen3 fast_video_features")
