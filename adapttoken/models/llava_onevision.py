"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): what the method needs from it.

- Frames -> the family's video processor (each frame resized to the tower's square input, 384 px
  for the released models) -> SigLIP -> projector -> 2x bilinear pooling of the patch grid: 196
  tokens per frame (14 x 14, raster order). One frame is one slice (`frames_per_slice = 1`);
  frames are encoded independently. The per-frame pixel cap of the sampling plan does not apply.
- Sequence: as transformers' processor lays a video out: all video tokens back to back with no
  per-frame text, then the model's one learned newline token (`image_newline`) after the video;
  pruning keeps the newline.
- Positions are 1D: the language model sees the assembled sequence with contiguous ids 0..L-1
  [ours] (full-video ids would leave the trained context range on long videos).
- t_pos (SliceFeatures coordinate 0) = the slice's index in the sampled video.
"""
from __future__ import annotations

import math

import torch

from ._common import FamilyAdapter, Sequence

# No measured reference layer for LLaVA-OneVision: ~0.7 of the depth (20 of 28 for the 7B), a guess.
REFERENCE_LAYER_FRACTION = 0.7


class LlavaOnevisionAdapter(FamilyAdapter):
    family = "llava_onevision"
    frames_per_slice = 1
    model_class_name = "LlavaOnevisionForConditionalGeneration"
    reference_layer_fraction = REFERENCE_LAYER_FRACTION

    def __init__(self, model, processor):
        super().__init__(model, processor)
        vc = model.config.vision_config
        self.image_size = int(vc.image_size)
        side = math.ceil(self.image_size // vc.patch_size / 2)
        self.grid = (side, side)
        self.video_token_id = model.config.video_token_id

    def resized_size(self, height, width, min_pixels=None, max_pixels=None):
        return (self.image_size, self.image_size)

    def token_grid(self, resized):
        return self.grid

    def time_positions(self, slice_times: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(slice_times), dtype=torch.long)

    @torch.inference_mode()
    def preprocess(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        """Frames resized to the tower's square input and normalised: [1, T, 3, s, s]."""
        dev = self.device
        s = self.image_size
        batch = self.processor.video_processor(videos=[frames.to(dev)], size={"height": s, "width": s},
                                               do_sample_frames=False, return_tensors="pt", device=dev)
        return batch["pixel_values_videos"].to(dev)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        cfg = self.config
        out = self.model.model.get_video_features(
            pixels, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = out.pooler_output.reshape(-1, out.pooler_output.shape[-1])
        T, tps = pixels.shape[1], self.grid[0] * self.grid[1]
        return feats[:T * tps].view(T, tps, -1)     # 5.23 appends the video's newline: not a slice's

    def encode(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        return self.encode_pixels(self.preprocess(frames, resized), resized)

    def _sequence(self, prompt, embeds, coords, extent) -> Sequence:
        pre, suf = prompt.prefix_ids.tolist(), prompt.suffix_ids.tolist()
        n = embeds.shape[0]
        ids = pre + [self.video_token_id] * (n + 1) + suf
        dev = self.device
        x = self._embed(ids)
        P = len(pre)
        x[P:P + n] = embeds.to(device=dev, dtype=x.dtype)
        x[P + n] = self.model.model.image_newline.to(x.dtype)
        pos = torch.arange(len(ids), device=dev)[None]
        return Sequence(x[None], pos, torch.arange(P, P + n), P + n + 1, ids)
