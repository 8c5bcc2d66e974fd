"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): what the method needs from this family.

- Frames -> resized to multiples of 32 (patch 16, 2x2 merge) with the per-frame pixel range, then the
  family's video processor with `do_resize=False` (its own resize bounds the pixels of the whole
  call, not of a frame) -> vision tower -> (H/32)*(W/32) tokens per 2-frame slice, raster order.
  The tower runs through `qwen3_vision_fast` (the module's own weights, one batched attention call
  per block instead of transformers' per-frame loop, compiled on CUDA); `use_fast_vision = False`
  gives transformers' `get_video_features`.
  The tower never attends across slices. Its deepstack features (one [N, D] per level, row-aligned
  with the main tokens) are cached with them: `encode` returns [S, tokens, D * (1 + levels)], so
  SliceFeatures caches and prunes every level with the same index; `forward` splits them again.
- Sequence [ours, see docs/FAMILIES.md]: each slice that keeps at least one token becomes
  `<t seconds><|vision_start|> kept tokens <|vision_end|>` (Qwen3-VL's timestamp text); slices
  with no kept token are left out entirely. `outer_wrapper` (default False, Qwen's original
  processor) puts the template's outer <|vision_start|>...<|vision_end|> pair around the whole
  video, as transformers 5.x's processor does; the layout stays a switch until it is settled.
- Positions: Qwen3-VL's rule (transformers 5.x `get_rope_index`, and Qwen's): text tokens count
  up; a slice block starting at `st` gives token (row, col) the ids (st, st + row, st + col), and
  the text after it resumes at st + max(rows, cols). Positions are those of the sequence actually
  built (kept slices only): within a kept slice pruning is a gather of the full block's ids. Time
  is carried by the timestamp text, not by the temporal id.
- t_pos (SliceFeatures coordinate 0) = -(1 + milliseconds since the first sampled frame): the
  time of the slice's first frame for its timestamp text, negative so that `extent_of` returns
  max(rows, cols) - 1 (the span of one slice block) without any change to SliceFeatures.
- Deepstack features are injected through the text model's own `visual_pos_masks` /
  `deepstack_visual_embeds` arguments by a pre-hook on the text model at the prefill call (the
  outer model fills them itself only from pixel inputs), for `forward` and `generate` alike.
"""
from __future__ import annotations

import contextlib

import torch

from ._common import (FamilyAdapter, Sequence, resize_exact, run_fast_tower, slice_runs,
                      video_processor_kwargs)

# No measured reference layer for Qwen3-VL: ~0.7 of the depth (25 of 36 for the 8B) is a guess.
REFERENCE_LAYER_FRACTION = 0.7


class Qwen3VLAdapter(FamilyAdapter):
    family = "qwen3_vl"
    frames_per_slice = 2
    model_class_name = "Qwen3VLForConditionalGeneration"
    reference_layer_fraction = REFERENCE_LAYER_FRACTION

    def __init__(self, model, processor, outer_wrapper: bool = False):
        super().__init__(model, processor)
        cfg = model.config
        self.vision_config = cfg.vision_config
        self.merge = cfg.vision_config.spatial_merge_size
        self.patch = cfg.vision_config.patch_size
        self.video_token_id = cfg.video_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.vision_end_id = cfg.vision_end_token_id
        self.main_dim = cfg.text_config.hidden_size
        self.deepstack_levels = len(getattr(cfg.vision_config, "deepstack_visual_indexes", []) or [])
        self.outer_wrapper = outer_wrapper
        self._vp_kwargs = video_processor_kwargs(processor.video_processor)
        self._stamp_cache: dict[str, list[int]] = {}
        # the batched tower (qwen3_vision_fast): one sdpa call per block instead of one per frame;
        # compile_vision as for Qwen2.5-VL: None = compiled on CUDA, True = compile, False = eager
        self.use_fast_vision = True
        self.compile_vision: bool | None = None

    # -- shape facts ---------------------------------------------------------------------------
    def resized_size(self, height, width, min_pixels=None, max_pixels=None):
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize
        f = self.patch * self.merge
        lo = min_pixels or f * f * 4
        hi = max_pixels or f * f * 768          # qwen-vl-utils' per-frame ceiling (768 tokens)
        return smart_resize(height, width, factor=f, min_pixels=lo, max_pixels=max(lo, hi))

    def token_grid(self, resized):
        f = self.patch * self.merge
        return resized[0] // f, resized[1] // f

    def time_positions(self, slice_times: torch.Tensor) -> torch.Tensor:
        return -(1 + torch.round(slice_times.double() * 1000).long())

    @staticmethod
    def seconds_of(t_pos: int) -> float:
        return (-int(t_pos) - 1) / 1000.0

    # -- vision --------------------------------------------------------------------------------
    def decode_resize(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        """The resize `preprocess` does, on CPU frames (see Qwen25VLAdapter.decode_resize)."""
        return resize_exact(frames, "cpu", resized)

    @torch.inference_mode()
    def preprocess(self, frames: torch.Tensor, resized: tuple[int, int]):
        """Resize to `resized` (bicubic, antialiased, as the processor would) on the model's device,
        then normalise + patchify with the family's processor: (pixel_values_videos, grid_thw)."""
        dev = self.device
        fr = resize_exact(frames, dev, resized)
        vp = self.processor.video_processor
        batch = vp(videos=[fr], do_resize=False, do_sample_frames=False, return_tensors="pt",
                   device=dev, **self._vp_kwargs)
        pv, grid = batch["pixel_values_videos"].to(dev), batch["video_grid_thw"].to(dev)
        rows, cols = self.token_grid(resized)
        if int(grid[0, 1]) != rows * self.merge or int(grid[0, 2]) != cols * self.merge:
            raise RuntimeError(f"video processor produced grid {grid.tolist()} for {resized}")
        return pv, grid

    @torch.inference_mode()
    def encode_pixels(self, pixels, resized: tuple[int, int]) -> torch.Tensor:
        """Vision tower -> [slices, rows*cols, D * (1 + deepstack levels)]: the main tokens, then
        each deepstack level, concatenated along the feature dim."""
        pv, grid = pixels
        rows, cols = self.token_grid(resized)
        visual = self.model.model.visual
        parts = None
        if self.use_fast_vision:
            from .qwen3_vision_fast import fast_video_features, is_supported
            if is_supported(visual):
                main, deep = run_fast_tower(
                    self, lambda c: fast_video_features(visual, pv, grid, compile=c))
                parts = [main] + list(deep)
        if parts is None:
            out = self.model.model.get_video_features(pv, grid)
            cat = lambda x: torch.cat(list(x)) if isinstance(x, (tuple, list)) else x  # noqa: E731
            parts = [cat(out.pooler_output)] + [cat(d) for d in (out.deepstack_features or [])]
        return torch.cat(parts, dim=-1).view(int(grid[0, 0]), rows * cols, -1)

    def encode(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        return self.encode_pixels(self.preprocess(frames, resized), resized)

    # -- sequence ------------------------------------------------------------------------------
    def _stamp(self, seconds: float) -> list[int]:
        text = f"<{seconds:.1f} seconds>"
        if text not in self._stamp_cache:
            self._stamp_cache[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._stamp_cache[text]

    def _sequence(self, prompt, embeds, coords, extent) -> Sequence:
        vs, ve = self.vision_start_id, self.vision_end_id
        pre, suf = prompt.prefix_ids.tolist(), prompt.suffix_ids.tolist()
        if not self.outer_wrapper:               # Qwen's original layout: no outer pair
            if pre and pre[-1] == vs:
                pre = pre[:-1]
            if suf and suf[0] == ve:
                suf = suf[1:]
        coords = coords.cpu().long()
        ids: list[int] = list(pre)
        pos: list[torch.Tensor] = [torch.arange(len(pre)).expand(3, -1)]
        rows: list[torch.Tensor] = []
        cur = len(pre)
        for a, b in slice_runs(coords):
            head = self._stamp(self.seconds_of(coords[0, a])) + [vs]
            pos.append(torch.arange(cur, cur + len(head)).expand(3, -1))
            ids += head
            cur += len(head)
            st = cur
            block = torch.stack([torch.full((b - a,), st), st + coords[1, a:b], st + coords[2, a:b]])
            rows.append(torch.arange(len(ids), len(ids) + b - a))
            ids += [self.video_token_id] * (b - a)
            pos.append(block)
            cur = st + extent + 1                # st + max(rows, cols)
            ids.append(ve)
            pos.append(torch.full((3, 1), cur))
            cur += 1
        q_start = len(ids) + (1 if self.outer_wrapper and suf and suf[0] == ve else 0)
        pos.append(torch.arange(cur, cur + len(suf)).expand(3, -1))
        ids += suf
        dev = self.device
        x = self._embed(ids)
        vis = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        x[vis.to(dev)] = embeds[:, :self.main_dim].to(device=dev, dtype=x.dtype)
        position_ids = torch.cat(pos, dim=1).to(dev)[:, None]
        seq = Sequence(x[None], position_ids, vis, q_start, ids)
        d = self.main_dim
        seq.deepstack = [embeds[:, d * (k + 1):d * (k + 2)].to(device=dev, dtype=x.dtype)
                         for k in range(self.deepstack_levels)]
        return seq

    def _context(self, seq: Sequence):
        if not self.deepstack_levels:
            return contextlib.nullcontext()
        return _Deepstack(self.text_model, seq)


class _Deepstack:
    """Pre-hook on the text model: at the prefill call (full prompt length), pass the pruned
    deepstack features and the mask of the visual rows through the model's own arguments."""

    def __init__(self, text_model, seq: Sequence):
        self.text_model = text_model
        L = seq.embeds.shape[1]
        self.length = L
        mask = torch.zeros(1, L, dtype=torch.bool, device=seq.embeds.device)
        mask[0, seq.visual_rows.to(mask.device)] = True
        self.mask, self.levels = mask, seq.deepstack

    def _hook(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is not None and x.shape[1] == self.length:
            kwargs["visual_pos_masks"] = self.mask
            kwargs["deepstack_visual_embeds"] = self.levels
        return args, kwargs

    def __enter__(self):
        self.handle = self.text_model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
