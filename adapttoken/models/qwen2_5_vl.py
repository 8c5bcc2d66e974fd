"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): everything the method needs from this family.

- Frames -> the family's own video processor (resize to multiples of 28 within the pixel range,
  normalise, patchify; on the model's device) -> vision tower -> 2x2-merged tokens, (H/28)*(W/28)
  per 2-frame slice, raster order (t, row, col). The tower never attends across slices, so slices
  can be encoded in any chunking with identical results.
- Positions: explicit 3D M-RoPE ids by Qwen's original rule (positions.py), passed to the model
  with `inputs_embeds`; `rope_deltas` state is never relied on.
- The attention probe is a pre-hook on one layer (probe.py); cancellation is a pre-hook on every
  layer; with the prefix key/value cache a group pass is a prefix pass plus a question-suffix
  pass, cold or warm alike (`_forward_prefix`); generation streams through a transformers streamer and stops on a StoppingCriteria.
- On CUDA the language model's RMSNorms and SiLU MLPs run fused, compiled kernels (fused_text.py;
  `adapter.fuse_text = False` for transformers' eager formula); the vision tower runs
  qwen_vision_fast, compiled on CUDA (`adapter.compile_vision`).
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch

from ..positions import build_position_ids
from ..question import NO_HOOKS, Hooks, Question
from ._common import (TextModelFacts, _LayerCancel, generate_from_embeds, load_pretrained,
                      option_token_ids, resize_exact, run_fast_tower)
from .base import Adapter, ForwardOut, Generation, Prompt
from .compat import cache_kwargs
from .fused_text import FusedTextAdapter
from .probe import AttentionProbe, token_scores
from .suffix_attention import install as install_suffix_attention
from .suffix_attention import suffix_pass

# FlexSelect's measured best reference layer for Qwen2.5-VL-7B: 20 of 28 (ALGORITHM.md step 4).
REFERENCE_LAYER_FRACTION = 20 / 28



def _layer_kv(cache, i: int):
    """(keys, values) [B, Hkv, L, hd] of layer i of a transformers DynamicCache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _probe_with_keys(attn, hidden_q, cos_q, sin_q, keys, q_pos) -> torch.Tensor:
    """The attention probe (probe.AttentionProbe) for query rows whose keys come from a KV cache:
    hidden_q [B, nq, D] (normalised layer input of the query rows), cos_q/sin_q [B, nq, hd] their
    rotary tables, keys [B, Hkv, L, hd] after RoPE (what the cache holds), q_pos [nq] the query rows'
    indices in the full sequence (causal mask). Returns [B, heads, nq, L] float32."""
    a = attn
    B, nq, _ = hidden_q.shape
    hd = a.head_dim
    q = a.q_proj(hidden_q).view(B, nq, -1, hd)
    if hasattr(a, "q_norm"):
        q = a.q_norm(q)
    q = q.transpose(1, 2)
    q = q * cos_q[:, None] + _rotate_half(q) * sin_q[:, None]
    hkv, L = keys.shape[1], keys.shape[2]
    g = q.shape[1] // hkv
    q = q.reshape(B, hkv, g, nq, hd).float()
    s = torch.einsum("bkgqd,bkld->bkgql", q, keys.float()) * a.scaling
    causal = torch.arange(L, device=keys.device).view(1, -1) > q_pos.view(-1, 1)
    s = s.masked_fill(causal, float("-inf"))
    return s.softmax(-1).reshape(B, hkv * g, nq, L)


class Qwen25VLAdapter(TextModelFacts, FusedTextAdapter, Adapter):
    family = "qwen2_5_vl"
    frames_per_slice = 2
    reference_layer_fraction = REFERENCE_LAYER_FRACTION

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        cfg = model.config
        self.config = cfg
        self.vision_config = cfg.vision_config
        self.merge = cfg.vision_config.spatial_merge_size
        self.patch = cfg.vision_config.patch_size
        self.tokens_per_second = cfg.vision_config.tokens_per_second
        self.video_token_id = cfg.video_token_id
        self.use_fast_vision = True
        # torch.compile of the fast tower's blocks: None (default) = qwen_vision_fast's own default
        # (compiled on CUDA, eager elsewhere and after a failed compile); True = compile (warns and
        # runs eager if it fails); False = eager
        self.compile_vision: bool | None = None
        # fused RMSNorm / SiLU-MLP kernels in the language model (fused_text.py): compiled on CUDA
        self.install_fused_text()
        # the question suffix's attention over the stored prefix as one GQA kernel with a
        # lower-right causal bias (suffix_attention.py); False: transformers' sdpa path there too
        self.fast_suffix = install_suffix_attention(self.model)
        vp = processor.video_processor
        self._vp_kwargs = {}
        params = inspect.signature(vp._preprocess).parameters
        if "cap_pixels_per_frame" in params:
            self._vp_kwargs["cap_pixels_per_frame"] = False

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: Path, dtype: torch.dtype, device: torch.device,
                    attn_implementation: str = "sdpa", options=None) -> "Qwen25VLAdapter":
        return cls(*load_pretrained("Qwen2_5_VLForConditionalGeneration", path, dtype, device,
                                    attn_implementation, options))

    # -- shape facts ---------------------------------------------------------------------------
    def resized_size(self, height, width, min_pixels=None, max_pixels=None):
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize
        size = self.processor.video_processor.size
        lo = min_pixels or size["shortest_edge"]
        hi = max_pixels or size["longest_edge"]
        return smart_resize(height, width, factor=self.patch * self.merge, min_pixels=lo,
                            max_pixels=hi)

    def token_grid(self, resized):
        f = self.patch * self.merge
        return resized[0] // f, resized[1] // f

    def time_positions(self, slice_times: torch.Tensor) -> torch.Tensor:
        # floor(seconds * tokens_per_second); a tiny epsilon keeps exact multiples exact in float64
        return torch.floor(slice_times.double() * self.tokens_per_second + 1e-9).long()

    # -- vision --------------------------------------------------------------------------------
    def decode_resize(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        """The resize `preprocess` does, on CPU frames (the decoder threads call it a few frames at
        a time, so full-size frames never pile up; preprocess then finds them at `resized`)."""
        return resize_exact(frames, "cpu", resized)

    @torch.inference_mode()
    def preprocess(self, frames: torch.Tensor, resized: tuple[int, int]):
        """Resize to exactly `resized` (bicubic, antialiased, as the processor would) on the model's
        device, then normalise + patchify: (pixel_values_videos, video_grid_thw). The processor's
        own resize cannot be told an exact size: with min = max = h*w its smart_resize lands on
        another (h', w') whenever the frame's aspect differs from h:w (e.g. 640x360 at 308x560)."""
        dev = self.device
        h, w = resized
        fr = resize_exact(frames, dev, resized)
        vp = self.processor.video_processor
        batch = vp(videos=[fr], size={"shortest_edge": h * w, "longest_edge": h * w},
                   do_sample_frames=False, return_tensors="pt", device=dev, **self._vp_kwargs)
        pv = batch["pixel_values_videos"].to(dev)
        grid = batch["video_grid_thw"].to(dev)
        rows, cols = self.token_grid(resized)
        if int(grid[0, 1]) != rows * self.merge or int(grid[0, 2]) != cols * self.merge:
            raise RuntimeError(f"video processor resized to {grid.tolist()} instead of {resized}")
        return pv, grid

    @torch.inference_mode()
    def encode_pixels(self, pixels, resized: tuple[int, int]) -> torch.Tensor:
        """The vision tower on preprocessed pixels -> [slices, rows*cols, D]."""
        pv, grid = pixels
        rows, cols = self.token_grid(resized)
        visual = self.model.model.visual
        if self.use_fast_vision:
            try:
                from .qwen_vision_fast import fast_video_features, is_supported
            except ImportError:
                fast_video_features = None
            if fast_video_features is not None and is_supported(visual):
                feats = run_fast_tower(self, lambda c: fast_video_features(
                    visual, pv.to(visual.dtype), grid, compile=c))
                return feats.view(int(grid[0, 0]), rows * cols, -1)
        feats = self.model.model.get_video_features(pv, grid).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (tuple, list)) else feats
        return feats.view(int(grid[0, 0]), rows * cols, -1)

    def encode(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        return self.encode_pixels(self.preprocess(frames, resized), resized)

    # -- prompt --------------------------------------------------------------------------------
    def build_prompt(self, question: Question) -> Prompt:
        proc, tok = self.processor, self.processor.tokenizer
        text = proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"},
                                          {"type": "text", "text": question.prompt_text()}]}],
            add_generation_prompt=True, tokenize=False)
        video_token = getattr(proc, "video_token", "<|video_pad|>")
        pre, suf = text.split(video_token)
        enc = lambda s: torch.tensor(tok.encode(s, add_special_tokens=False), dtype=torch.long)  # noqa: E731
        opt_ids = option_token_ids(tok, question.letters) if question.is_multiple_choice else None
        return Prompt(question, enc(pre), enc(suf), opt_ids)

    # -- language model ------------------------------------------------------------------------
    def _inputs(self, prompt: Prompt, embeds: torch.Tensor, coords: torch.Tensor, extent: int):
        dev = self.device
        E = self.model.get_input_embeddings()
        pre = E(prompt.prefix_ids.to(dev))
        suf = E(prompt.suffix_ids.to(dev))
        x = torch.cat([pre, embeds.to(device=dev, dtype=pre.dtype), suf])[None]
        pos = build_position_ids(len(prompt.prefix_ids), coords.to(dev), extent,
                                 len(prompt.suffix_ids))[:, None]
        return x, pos

    supports_prefix_cache = True

    @torch.inference_mode()
    def forward(self, prompt, embeds, coords, extent, probe_layer=None, aggregation="max",
                hooks: Hooks = NO_HOOKS, prefix_cache=None) -> ForwardOut:
        """prefix_cache: (PrefixKVCache, key) to reuse / keep the keys and values of the prefix and
        visual tokens (question-independent) across questions on the same group; the pass then
        runs as a prefix pass plus a question-suffix pass whether or not the store has the prefix
        (`_forward_prefix`), so a repeated question gives bit-identical results. Without it: one
        pass over the whole sequence (equal up to float rounding)."""
        if prefix_cache is not None:
            return self._forward_prefix(prompt, embeds, coords, extent, probe_layer, aggregation,
                                        hooks, *prefix_cache)
        x, pos = self._inputs(prompt, embeds, coords, extent)
        n_pre, n_vis = len(prompt.prefix_ids), embeds.shape[0]
        with _LayerCancel(self.text_model.layers, hooks):
            if probe_layer is None:
                logits = self.model(inputs_embeds=x, position_ids=pos, use_cache=False,
                                    logits_to_keep=1).logits[0, -1]
                return ForwardOut(logits.float())
            with AttentionProbe(self.text_model.layers[probe_layer].self_attn) as probe:
                logits = self.model(inputs_embeds=x, position_ids=pos, use_cache=False,
                                    logits_to_keep=1).logits[0, -1]
        # query rows: every token after the visual span, <|vision_end|> excluded
        q_idx = torch.arange(n_pre + n_vis + 1, x.shape[1], device=x.device)
        attn = probe.attention(q_idx, slice(n_pre, n_pre + n_vis))
        return ForwardOut(logits.float(), token_scores(attn, aggregation, self.tp_group)[0])

    def _run(self, x, pos, cache):
        """One language-model call on input embeddings `x` at position ids `pos` that extends the
        key/value `cache` (a transformers DynamicCache); the last position's logits. The only
        place the cache keyword is passed."""
        return self.model(inputs_embeds=x, position_ids=pos, use_cache=True, logits_to_keep=1,
                          **cache_kwargs(self.model, cache)).logits[0, -1]

    def _forward_prefix(self, prompt, embeds, coords, extent, probe_layer, aggregation, hooks,
                        store, key) -> ForwardOut:
        """A group pass in two calls, the same whether or not `store` holds the group's prefix:
        (1) the prefix pass over the system text and the visual tokens (rows whose keys and values
        do not depend on the question), skipped when the store has them; (2) the question suffix
        against those keys and values, with the probe computed from them (`_probe_with_keys`).
        A cold and a warm pass thus run the same kernels on the same tensors: bit-identical
        logits and scores (the host tier's copies are exact too)."""
        from transformers import DynamicCache
        x, pos = self._inputs(prompt, embeds, coords, extent)
        n_pre, n_vis = len(prompt.prefix_ids), embeds.shape[0]
        n0 = n_pre + n_vis                       # rows whose keys/values ignore the question
        layers = self.text_model.layers
        with _LayerCancel(layers, hooks):
            kv = store.get(key, x.device)
            if kv is None:                       # (1) the prefix pass
                pre = DynamicCache()
                self._run(x[:, :n0], pos[:, :, :n0], pre)
                kv = [tuple(_layer_kv(pre, i)) for i in range(len(layers))]
                del pre
                nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                             for k, v in kv)
                store.offer(key, kv, nbytes, x.device)
            cache = DynamicCache()
            for i, (k, v) in enumerate(kv):
                cache.update(k, v, i)
            del kv
            x, pos = x[:, n0:], pos[:, :, n0:]
            # (2) the question suffix: one unpadded sequence after every cached key
            with suffix_pass() if self.fast_suffix else contextlib.nullcontext():
                if probe_layer is None:
                    return ForwardOut(self._run(x, pos, cache).float())
                with AttentionProbe(layers[probe_layer].self_attn) as probe:
                    logits = self._run(x, pos, cache)
        keys, _ = _layer_kv(cache, probe_layer)
        # on the probed layer's device (with a device map it may not be the input's)
        local = torch.arange(1, x.shape[1], device=probe.hidden.device)   # <|vision_end|> excluded
        attn = _probe_with_keys(layers[probe_layer].self_attn, probe.hidden[:, local],
                                probe.cos[:, local], probe.sin[:, local], keys.to(local.device),
                                local + n0)[..., n_pre:n0]
        return ForwardOut(logits.float(), token_scores(attn, aggregation, self.tp_group)[0])

    @torch.inference_mode()
    def generate(self, prompt, embeds, coords, extent, max_new_tokens=32, do_sample=False,
                 temperature=1.0, top_p=1.0, seed=0, hooks: Hooks = NO_HOOKS,
                 return_logits=True) -> Generation:
        tok = self.tokenizer
        x, pos = self._inputs(prompt, embeds, coords, extent)
        return generate_from_embeds(
            self.model, tok, self.text_model.layers, x, pos, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), hooks=hooks,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_p=top_p, seed=seed, return_logits=return_logits)
