"""Fast forward of the Qwen2.5-VL vision tower (``model.model.visual``) for video features.

``fast_video_features(visual, pixel_values, grid_thw)`` returns what
``model.model.get_video_features(pixel_values, grid_thw).pooler_output`` returns, concatenated over
the videos (merged tokens in raster order t, row, col), computed with the module's own weights and
submodules (norms, qkv/proj, rotary, MLP, merger). What changes is the attention:

* transformers' sdpa path loops in Python over every window (64 patches) and every full-attention
  slice, one sdpa call each (~1000 calls per layer at 128 frames of 448x448);
* here the tokens are laid out so that all windows of the same length are contiguous, and each
  block does one batched sdpa call per distinct window length (one call when the frame size is a
  multiple of 112 px; at most four per frame size otherwise: full windows, the right edge, the
  bottom edge, the corner). Full-attention blocks (``fullatt_block_indexes``) attend within each
  temporal slice: one batched sdpa call per distinct slice size.

Layout: the tower works on spatial-merge units (2x2 patches kept together, as the merger needs).
The "window layout" orders units by window length class, then in transformers' own window order
(video, slice, window row, window col, raster inside the window); with one class it *is*
transformers' order. The "slice layout" is transformers' order grouped by slice size, so each slice
is contiguous. Hidden states are gathered between the two layouts only around full-attention
blocks and only when they differ (ragged tilings or mixed frame sizes). Keys keep transformers'
order inside every window and slice, so results agree with transformers up to the attention
kernel's batching (float32 on CPU: bit-identical in the tests; float64: identical).

On CUDA the patch embedding is the Conv3d's weight applied as one matmul (kernel == stride, no
bias: the same sum in another order; 0.38 ms vs 8.4 ms for cuDNN's Conv3d at 65,536 patches on an
H100); elsewhere the module's Conv3d.
The eager rotary computes transformers' float32 formula bit for bit in fewer passes over memory.
``compile`` (default on CUDA) runs the per-block code before and after the attention through
``torch.compile`` (fuses norms, rotary and gating; numerics then differ at bf16 rounding level).
In eager, the 3420-wide MLP matmuls (gate/up/down) ran on sm80 cutlass kernels at ~2.4 ms each,
against ~0.8 ms in the compiled graph, whose intermediates inductor pads (6840-byte rows are not
16-byte aligned); writing eager's intermediates into padded buffers with ``out=`` made it slower.

Measured (H100, bf16, random 7B-architecture weights, 128 frames at 448x448, transformers 5.17,
torch 2.11; ``python -m adapttoken.bench.vision``, medians of 5): transformers sdpa 1385 ms (its
Python loop makes it vary: 1724 ms in another run), eager 478 ms (2.9x), compiled 202 ms (6.9x;
427 TFLOP/s counted). At 308x560 (ragged windows): 1878 / 415 / 171 ms (4.5x / 11x).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["fast_video_features", "is_supported", "VisionLayout", "build_layout", "count_flops"]


# ----------------------------------------------------------------------------------------------
# module checks


def _block_ok(blk) -> bool:
    attn = getattr(blk, "attn", None)
    mlp = getattr(blk, "mlp", None)
    if attn is None or mlp is None:
        return False
    for name in ("qkv", "proj", "num_heads", "head_dim", "scaling"):
        if not hasattr(attn, name):
            return False
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(mlp, name):
            return False
    for name in ("norm1", "norm2"):
        norm = getattr(blk, name, None)
        if norm is None or not hasattr(norm, "weight"):
            return False
    qkv = attn.qkv
    return (isinstance(qkv, torch.nn.Linear) and qkv.out_features == 3 * qkv.in_features
            and attn.num_heads * attn.head_dim == qkv.in_features)


def is_supported(visual) -> bool:
    """True when `visual` looks like the transformers 5.x Qwen2.5-VL vision tower this module knows:
    Conv3d patch embed without bias, axial rotary called as ``rotary_pos_emb(x, position_ids)``,
    windowed blocks (qkv/proj, RMSNorm, gated MLP) and the 2x2 patch merger."""
    try:
        if type(visual).__name__ != "Qwen2_5_VisionTransformerPretrainedModel":
            return False
        for name in ("spatial_merge_size", "patch_size", "window_size", "fullatt_block_indexes",
                     "patch_embed", "rotary_pos_emb", "blocks", "merger"):
            if not hasattr(visual, name):
                return False
        pe = visual.patch_embed
        proj = getattr(pe, "proj", None)
        if not isinstance(proj, torch.nn.Conv3d) or proj.bias is not None:
            return False
        if tuple(proj.kernel_size) != tuple(proj.stride):
            return False
        rot = visual.rotary_pos_emb
        # transformers 5.x: forward(x, position_ids) with an (h, w) axial recomposition.
        # 4.x had visual.rot_pos_emb(grid_thw) instead: not supported here.
        if not hasattr(rot, "inv_freq") or not hasattr(rot, "recomposition_frequencies"):
            return False
        if hasattr(visual, "rot_pos_emb"):
            return False
        if len(visual.blocks) == 0 or not all(_block_ok(b) for b in visual.blocks):
            return False
        m = visual.merger
        if not hasattr(m, "ln_q") or not hasattr(m, "mlp"):
            return False
        ms, ps, ws = int(visual.spatial_merge_size), int(visual.patch_size), int(visual.window_size)
        if ms < 1 or ws // ms // ps < 1:
            return False
        return True
    except Exception:  # pragma: no cover - defensive: anything odd means "not the tower we know"
        return False


# ----------------------------------------------------------------------------------------------
# layout


@dataclass
class VisionLayout:
    """Index tensors describing the window and slice layouts for one ``grid_thw``.

    All indices are over spatial-merge units (``unit`` = merge*merge consecutive patch rows of
    ``pixel_values``) or over patches (``*_patch``), on the target device.
    """
    n_patches: int
    unit: int                     # patches per merge unit (4)
    win_units: torch.Tensor       # [U] unit id (raster order) at each window-layout position
    win_groups: tuple             # ((start_patch, n_windows, window_len_patches), ...)
    slice_groups: tuple           # ((start_patch, n_slices, slice_len_patches), ...) in slice layout
    to_slice: torch.Tensor | None  # [N] patch gather window layout -> slice layout (None: same)
    to_window: torch.Tensor | None  # [N] inverse of to_slice
    pos_win: torch.Tensor         # [N, 2] (h, w) patch coordinates in window layout
    pos_slice: torch.Tensor | None  # [N, 2] in slice layout (None: same as window)
    inv_units: torch.Tensor       # [U] window-layout position of each raster unit


def _runs(sizes: list[int]) -> tuple:
    """Collapse consecutive equal lengths into (start, count, length) groups."""
    groups, start = [], 0
    for L in sizes:
        if groups and groups[-1][2] == L:
            s, n, _ = groups[-1]
            groups[-1] = (s, n + 1, L)
        else:
            groups.append((start, 1, L))
        start += L
    return tuple(groups)


def build_layout(grid_thw, spatial_merge_size: int, window_size: int, patch_size: int,
                 device=None) -> VisionLayout:
    """Compute the window/slice layouts for ``grid_thw`` ([n_videos, 3] of (t, h, w) in patches)."""
    grid = [tuple(int(v) for v in row) for row in torch.as_tensor(grid_thw).tolist()]
    m = int(spatial_merge_size)
    unit = m * m
    ws = window_size // m // patch_size  # window side in merge units (4 for 112 px)
    hf_units, hf_lens = [], []           # transformers' window order and window lengths (units)
    slice_sizes = []                     # per video: units per slice
    unit_row, unit_col = [], []          # raster unit -> (row, col) in units
    offset = 0
    for t, h, w in grid:
        if h % m or w % m:
            raise ValueError(f"grid_thw row {(t, h, w)}: h and w must be multiples of the merge size {m}")
        uh, uw = h // m, w // m
        idx = torch.arange(t * uh * uw).reshape(t, uh, uw)
        nh, nw = -(-uh // ws), -(-uw // ws)
        pad = F.pad(idx, (0, nw * ws - uw, 0, nh * ws - uh), value=-1)
        win = pad.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(-1, ws * ws)
        valid = win >= 0
        hf_units.append(win[valid] + offset)
        hf_lens.extend(valid.sum(1).tolist())
        slice_sizes.append((t, uh * uw))
        rr, cc = torch.meshgrid(torch.arange(uh), torch.arange(uw), indexing="ij")
        unit_row.append(rr.reshape(-1).repeat(t))
        unit_col.append(cc.reshape(-1).repeat(t))
        offset += t * uh * uw
    U = offset
    hf_order = torch.cat(hf_units)
    unit_row, unit_col = torch.cat(unit_row), torch.cat(unit_col)

    # window layout: windows grouped by length (largest first), transformers' order within
    lens = torch.tensor(hf_lens)
    starts = torch.cumsum(lens, 0) - lens
    classes = sorted(set(hf_lens), reverse=True)
    win_parts, win_sizes = [], []
    for L in classes:
        sel = (lens == L).nonzero().flatten()
        n = sel.numel()
        ids = (starts[sel, None] + torch.arange(L)[None, :]).reshape(-1)
        win_parts.append(hf_order[ids])
        win_sizes.extend([L * unit] * n)
    win_units = torch.cat(win_parts)
    win_groups = _runs(win_sizes)

    # slice layout: transformers' order, videos grouped by slice size (stable)
    vid_starts, acc = [], 0
    for t, s in slice_sizes:
        vid_starts.append(acc)
        acc += t * s
    order = sorted(range(len(grid)), key=lambda i: [s for _, s in slice_sizes].index(slice_sizes[i][1]))
    sl_parts, sl_sizes = [], []
    for i in order:
        t, s = slice_sizes[i]
        sl_parts.append(hf_order[vid_starts[i]:vid_starts[i] + t * s])
        sl_sizes.extend([s * unit] * t)
    slice_units = torch.cat(sl_parts)
    slice_groups = _runs(sl_sizes)

    inv_units = torch.empty(U, dtype=torch.long)
    inv_units[win_units] = torch.arange(U)
    sub = torch.arange(unit)

    def patches(units_pos):  # unit positions -> patch positions
        return (units_pos[:, None] * unit + sub[None, :]).reshape(-1)

    def coords(units):  # (h, w) patch coordinates for the patches of these units
        r = unit_row[units][:, None] * m + (sub // m)[None, :]
        c = unit_col[units][:, None] * m + (sub % m)[None, :]
        return torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1)

    same = torch.equal(slice_units, win_units)
    to_slice = None if same else patches(inv_units[slice_units])
    to_window = None
    if to_slice is not None:
        to_window = torch.empty_like(to_slice)
        to_window[to_slice] = torch.arange(to_slice.numel())
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def mv(x):
        return None if x is None else x.to(dev)

    return VisionLayout(
        n_patches=U * unit, unit=unit, win_units=mv(win_units), win_groups=win_groups,
        slice_groups=slice_groups, to_slice=mv(to_slice), to_window=mv(to_window),
        pos_win=mv(coords(win_units)), pos_slice=None if same else mv(coords(slice_units)),
        inv_units=mv(inv_units))


_LAYOUT_CACHE: dict = {}


def _layout_for(visual, grid_thw, device) -> VisionLayout:
    key = (tuple(tuple(int(v) for v in r) for r in torch.as_tensor(grid_thw).tolist()),
           int(visual.spatial_merge_size), int(visual.window_size), int(visual.patch_size), str(device))
    lay = _LAYOUT_CACHE.get(key)
    if lay is None:
        if len(_LAYOUT_CACHE) > 32:
            _LAYOUT_CACHE.clear()
        lay = build_layout(grid_thw, visual.spatial_merge_size, visual.window_size,
                           visual.patch_size, device)
        _LAYOUT_CACHE[key] = lay
    return lay


# ----------------------------------------------------------------------------------------------
# forward


def _rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def _rotary_plain(qkv, cos, sin):
    """transformers' apply_rotary_pos_emb_vision on q and k at once: float32 math, cast back.
    qkv: [N, 3, H, d]; cos, sin: [N, 1, d] float32. Returns [2, N, H, d] (q, k) in qkv's dtype."""
    qk = qkv[:, :2].transpose(0, 1).float()
    return ((qk * cos) + (_rotate_half(qk) * sin)).to(qkv.dtype)


def _rotary_eager(qkv, cos, sin_lo_neg, sin_hi):
    """Bit-identical to `_rotary_plain` with fewer passes over memory (no float copy of q/k, no
    concatenation, cast fused into the add): rotate_half(x)*sin = [x_hi*(-sin_lo), x_lo*sin_hi],
    and x*(-s) == -(x*s) exactly in IEEE arithmetic."""
    h = qkv.shape[-1] // 2
    src = qkv[:, :2].transpose(0, 1)                          # [2, N, H, d] view
    if src.dtype.itemsize > 4:  # transformers rounds wider inputs (float64) to float32 here too
        src = src.float()
    a = torch.mul(src, cos)                                   # float32 (type promotion, exact)
    b = torch.empty_like(a)
    torch.mul(src[..., h:], sin_lo_neg, out=b[..., :h])
    torch.mul(src[..., :h], sin_hi, out=b[..., h:])
    out = torch.empty(src.shape, dtype=qkv.dtype, device=qkv.device)
    return torch.add(a, b, out=out)                           # float32 sum, rounded once


def _segment_attention(qk, v, groups, num_heads, head_dim, scale):
    """qk: [2, N, H, d] (rotated q, k); v: [N, H, d] view. One sdpa call per group of equal-length
    segments; returns [N, H*d]."""
    outs = []
    for start, n, L in groups:
        end = start + n * L
        q = qk[0, start:end].unflatten(0, (n, L)).transpose(1, 2)
        k = qk[1, start:end].unflatten(0, (n, L)).transpose(1, 2)
        vv = v[start:end].unflatten(0, (n, L)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, vv, scale=scale)
        outs.append(o.transpose(1, 2).reshape(n * L, num_heads * head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _attn_in(blk, x, cos, sin):
    """norm1, qkv, rotary (plain formulation: what torch.compile sees). -> (qk [2,N,H,d], v)."""
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(x)).view(x.shape[0], 3, attn.num_heads, attn.head_dim)
    return _rotary_plain(qkv, cos, sin), qkv[:, 2]


# The compiled MLP adds the gate/up biases in the activation's kernel, not in the matmuls (PERF_NOTES
# item 30). Inductor pads the 3420-wide outputs to 3424 columns; into such a padded output cuBLAS
# has no bias epilogue, so torch first fills the output with the broadcast bias (a 193 MB write per
# projection, 2 x 32 per 32-slice chunk: ~10.6 ms of an 86 ms chunk on an H200) and then runs
# the GEMM with beta = 1. A bias-free matmul skips that fill; the bias is read by the fused
# silu-product kernel, which reads the matmul outputs anyway. Only for plain nn.Linear layers without
# hooks (FP8's layers, hooked layers keep their own forward). False: the module's own MLP forward (the A/B switch of
# `profile_gpu --parts vision`).
_MLP_BIAS_IN_ACTIVATION = True


def _mlp(mlp, h):
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)   # Qwen3-VL: fc1/fc2
    if (_MLP_BIAS_IN_ACTIVATION and type(gate) is torch.nn.Linear and type(up) is torch.nn.Linear
            and gate.bias is not None and up.bias is not None
            and not (gate._forward_hooks or gate._forward_pre_hooks or up._forward_hooks
                     or up._forward_pre_hooks)):
        g = F.linear(h, gate.weight) + gate.bias
        u = F.linear(h, up.weight) + up.bias
        return mlp.down_proj(mlp.act_fn(g) * u)
    return mlp(h)


def _attn_out_mlp(blk, x, o):
    x = x + blk.attn.proj(o)
    return x + _mlp(blk.mlp, blk.norm2(x))


def _block_eager(blk, x, rot, groups):
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(x)).view(x.shape[0], 3, attn.num_heads, attn.head_dim)
    qk = _rotary_eager(qkv, rot[0], rot[2], rot[3])
    o = _segment_attention(qk, qkv[:, 2], groups, attn.num_heads, attn.head_dim, attn.scaling)
    x = x + attn.proj(o)
    return x + blk.mlp(blk.norm2(x))


_COMPILED: dict = {}


def _compiled(name, fn):
    c = _COMPILED.get(name)
    if c is None:
        # shapes: static on the first call, then dynamic in N (automatic dynamic shapes); the
        # attention (whose grouping depends on the grid) stays outside, between the two graphs
        c = _COMPILED[name] = torch.compile(fn)
    return c


def _block_compiled(blk, x, rot, groups):
    attn = blk.attn
    qk, v = _compiled("attn_in", _attn_in)(blk, x, rot[0], rot[1])
    o = _segment_attention(qk, v, groups, attn.num_heads, attn.head_dim, attn.scaling)
    return _compiled("attn_out_mlp", _attn_out_mlp)(blk, x, o)


def _rotary(visual, x, pos):
    """cos/sin for these patch positions from the module's rotary embedding, shaped [N, 1, d]
    float32, plus (-sin[..., :d/2], sin[..., d/2:]) for `_rotary_eager`."""
    cos, sin = visual.rotary_pos_emb(x, pos)
    cos, sin = cos.float()[:, None, :], sin.float()[:, None, :]
    h = sin.shape[-1] // 2
    return cos, sin, -sin[..., :h], sin[..., h:].contiguous()


def fast_video_features(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        *, compile: bool | None = None, patch_matmul: bool | None = None) -> torch.Tensor:
    """Merged vision features of the videos in ``grid_thw``: ``[sum_v t*h*w/merge^2, out_hidden]``,
    equal to ``torch.cat(model.model.get_video_features(pixel_values, grid_thw).pooler_output)``.

    ``visual`` is ``model.model.visual`` (used as is, no copies). Runs under ``torch.no_grad``.
    ``compile``: run the per-block code before and after the attention through ``torch.compile``
    (fuses norms, rotary, gating; ~2.5x faster than eager on an H100 at 128 frames). The first call
    compiles (~10 s), a second frame count recompiles once with dynamic shapes (~5 s), later ones
    reuse it. Default (None): on for CUDA, off elsewhere; when the default's compile fails (no
    Triton, say) it warns once and runs eager from then on. ``compile=True`` raises instead.
    ``patch_matmul``: apply the patch-embedding Conv3d's weight as one matmul (the same sum, in
    another order) instead of calling the Conv3d; default: matmul on CUDA, the module elsewhere.
    Raises ValueError when ``visual`` is not a tower this module supports (see ``is_supported``).
    """
    if not is_supported(visual):
        raise ValueError(f"{type(visual).__name__} is not a Qwen2.5-VL vision tower that "
                         "fast_video_features supports; use model.model.get_video_features instead")
    return run_compiled_or_eager(lambda c: _forward(visual, pixel_values, grid_thw, c, patch_matmul),
                                 compile, visual.patch_embed.proj.weight.device, "failed",
                                 "fast_video_features")


def _compile_by_default(device, failed_key: str = "failed") -> bool:
    return device.type == "cuda" and not _COMPILED.get(failed_key)


def run_compiled_or_eager(forward, compile, device, failed_key: str, label: str):
    """``forward(compiled: bool)`` under no_grad. ``compile`` None: compiled on CUDA unless an earlier
    default compile failed (``_COMPILED[failed_key]``); a failure then warns once and runs eager from
    then on. True: compiled, a failure raises. False: eager. Shared by the Qwen2.5-VL and Qwen3-VL
    towers."""
    use_compile = compile
    if compile is None:
        use_compile = _compile_by_default(device, failed_key)
    with torch.no_grad():
        if use_compile:
            try:
                return forward(True)
            except Exception as e:
                if compile:
                    raise
                _COMPILED[failed_key] = True
                warnings.warn(f"{label}: torch.compile failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); using the eager path from now on", RuntimeWarning)
        return forward(False)


def _patch_embed(visual, pixel_values, matmul):
    pe = visual.patch_embed
    w = pe.proj.weight                                   # [D, C, T, P, P]
    pv = pixel_values.to(device=w.device, dtype=w.dtype)
    if matmul is None:
        matmul = w.device.type == "cuda"
    if matmul:  # Conv3d with kernel == stride and no bias == one matmul over each patch row
        return F.linear(pv.reshape(pv.shape[0], -1), w.reshape(w.shape[0], -1))
    return pe(pv)


def _forward(visual, pixel_values, grid_thw, compile, patch_matmul):
    w = visual.patch_embed.proj.weight           # [D, C, T, P, P]
    device = w.device
    lay = _layout_for(visual, grid_thw, device)
    n = pixel_values.shape[0]
    if n != lay.n_patches:
        raise ValueError(f"pixel_values has {n} rows but grid_thw describes {lay.n_patches} patches")
    D = w.shape[0]
    x = _patch_embed(visual, pixel_values, patch_matmul)
    x = x.view(-1, lay.unit, D)[lay.win_units].view(n, D)   # window layout

    rot_w = _rotary(visual, x, lay.pos_win)
    rot_s = _rotary(visual, x, lay.pos_slice) if lay.pos_slice is not None else rot_w

    full = set(int(i) for i in visual.fullatt_block_indexes)
    in_slice = False
    for i, blk in enumerate(visual.blocks):
        want_slice = i in full
        if want_slice != in_slice and lay.to_slice is not None:
            x = x[lay.to_slice] if want_slice else x[lay.to_window]
        in_slice = want_slice
        rot, groups = (rot_s, lay.slice_groups) if want_slice else (rot_w, lay.win_groups)
        if compile:
            x = _block_compiled(blk, x, rot, groups)
        else:
            x = _block_eager(blk, x, rot, groups)
    if in_slice and lay.to_window is not None:
        x = x[lay.to_window]
    merged = visual.merger(x)                      # [U, out] in window layout
    return merged[lay.inv_units]                   # raster order (video, t, row, col)


# ----------------------------------------------------------------------------------------------
# cost model (for benchmarks)


def count_flops(cfg, grid_thw) -> dict:
    """Matmul + attention FLOPs of one vision-tower forward (multiply-add = 2 FLOPs)."""
    D, I, depth = cfg.hidden_size, cfg.intermediate_size, cfg.depth
    out = cfg.out_hidden_size
    m = cfg.spatial_merge_size
    lay = build_layout(grid_thw, m, cfg.window_size, cfg.patch_size)
    N = lay.n_patches
    in_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    per_layer_mm = 2 * N * (D * 3 * D + D * D + 3 * D * I)
    win_att = sum(n * 4 * L * L * D for _, n, L in lay.win_groups)
    full_att = sum(n * 4 * L * L * D for _, n, L in lay.slice_groups)
    n_full = sum(1 for i in cfg.fullatt_block_indexes if i < depth)
    merged = N // (m * m)
    hm = D * m * m
    f = {
        "patch_embed": 2 * N * in_dim * D,
        "blocks_matmul": depth * per_layer_mm,
        "attention": (depth - n_full) * win_att + n_full * full_att,
        "merger": 2 * merged * (hm * hm + hm * out),
    }
    f["total"] = sum(f.values())
    return f
