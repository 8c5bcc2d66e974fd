"""InternVL 2.5 / 3 in the transformers format (`InternVLForConditionalGeneration`, the "-hf"
checkpoints): what the method needs from this family.

- Frames -> the family's video processor (each frame squashed to the tower's square input, 448 px
  for the released models, normalised) -> InternViT -> pixel shuffle 0.5 -> projector: 256 tokens
  per frame (16 x 16) in raster order. One frame is one slice (`frames_per_slice = 1`); frames are
  encoded independently. The per-frame pixel cap of the sampling plan does not apply.
- Sequence: transformers' InternVL processor layout, `Frame{i}: <img> tokens </img>` per frame,
  frames joined by a newline. Each frame that keeps at least one token keeps its wrapper; frames
  with no kept token are left out entirely [ours]. `frame_labels`: "original" (default [ours]) numbers
  a frame by its place in the sampled video (1-based), so the labels of the kept frames keep the
  temporal gaps; "kept" renumbers the kept frames 1, 2, 3...
- Positions are 1D: the language model sees the assembled sequence with contiguous ids 0..L-1
  [ours]. Keeping the full-video ids instead would put 1024 frames at ~262k positions, far past the
  32k the LLMs were trained on.
- t_pos (SliceFeatures coordinate 0) = the slice's index in the sampled video.
"""
from __future__ import annotations

import torch

from ._common import FamilyAdapter, Sequence, slice_runs

# FlexSelect measured layer 15 of 32 as the best reference layer for InternVL2.5-8B; other depths
# (InternVL3-8B: 28 layers -> 13) scale that fraction, which is a guess.
REFERENCE_LAYER_FRACTION = 15 / 32


def _pair(x):
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


class InternVLAdapter(FamilyAdapter):
    family = "internvl"
    frames_per_slice = 1
    model_class_name = "InternVLForConditionalGeneration"
    reference_layer_fraction = REFERENCE_LAYER_FRACTION

    def __init__(self, model, processor, frame_labels: str = "original"):
        super().__init__(model, processor)
        cfg = model.config
        self.image_size = _pair(cfg.vision_config.image_size)
        patch = _pair(cfg.vision_config.patch_size)
        r = cfg.downsample_ratio
        self.grid = (int(self.image_size[0] // patch[0] * r), int(self.image_size[1] // patch[1] * r))
        tok = processor.tokenizer
        self.image_token_id = cfg.image_token_id
        self.start_id = tok.convert_tokens_to_ids(processor.start_image_token)
        self.end_id = tok.convert_tokens_to_ids(processor.end_image_token)
        if frame_labels not in ("original", "kept"):
            raise ValueError("frame_labels: use 'original' or 'kept'")
        self.frame_labels = frame_labels
        self._head_cache: dict[str, list[int]] = {}

    def resized_size(self, height, width, min_pixels=None, max_pixels=None):
        return self.image_size

    def token_grid(self, resized):
        return self.grid

    def time_positions(self, slice_times: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(slice_times), dtype=torch.long)

    @torch.inference_mode()
    def preprocess(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        """Frames squashed to the tower's input size and normalised, on the model's device."""
        dev = self.device
        h, w = self.image_size
        batch = self.processor.video_processor(videos=[frames.to(dev)], size={"height": h, "width": w},
                                               do_sample_frames=False, return_tensors="pt", device=dev)
        return batch["pixel_values_videos"].to(dev).flatten(0, 1)       # [T, 3, h, w]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        cfg = self.config
        out = self.model.model.get_image_features(
            pixels, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return out.pooler_output.reshape(pixels.shape[0], self.grid[0] * self.grid[1], -1)

    def encode(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        return self.encode_pixels(self.preprocess(frames, resized), resized)

    def _head(self, text: str) -> list[int]:
        if text not in self._head_cache:
            self._head_cache[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._head_cache[text]

    def _sequence(self, prompt, embeds, coords, extent) -> Sequence:
        pre, suf = prompt.prefix_ids.tolist(), prompt.suffix_ids.tolist()
        coords = coords.cpu().long()
        ids: list[int] = list(pre)
        rows = []
        for k, (a, b) in enumerate(slice_runs(coords)):
            label = int(coords[0, a]) + 1 if self.frame_labels == "original" else k + 1
            ids += self._head(("\n" if k else "") + f"Frame{label}: ") + [self.start_id]
            rows.append(torch.arange(len(ids), len(ids) + b - a))
            ids += [self.image_token_id] * (b - a) + [self.end_id]
        q_start = len(ids)
        ids += suf
        dev = self.device
        x = self._embed(ids)
        vis = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        x[vis.to(dev)] = embeds.to(device=dev, dtype=x.dtype)
        pos = torch.arange(len(ids), device=dev)[None]
        return Sequence(x[None], pos, vis, q_start, ids)
