"""What the family adapters share.

All of them: `generate_from_embeds` (greedy or sampled generation with streaming and cancellation,
`_LayerCancel`); both Qwen families: `resize_exact`. The Qwen3-VL, InternVL and LLaVA-OneVision
adapters also share `FamilyAdapter`: each builds its own input sequence (`_sequence`): the prompt
text around the kept visual tokens, with the family's per-slice wrappers, the position ids and where
the visual rows are. The rest is the same for all: the no-cache forward with `logits_to_keep=1`, the
attention probe on one layer (probe.py), loading from a local folder.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdaptTokenError, Cancelled, InputError, ModelLoadError
from ..question import NO_HOOKS, Hooks, Question
from .base import Adapter, ForwardOut, Generation, Prompt
from .fused_text import FusedTextAdapter
from .probe import AttentionProbe, token_scores


@dataclass
class Sequence:
    """One assembled input: embeddings [1, L, D], position ids ([1, L] or [3, 1, L]), the rows of
    the visual tokens in input order [n], and the first query row (the question after the video)."""
    embeds: torch.Tensor
    position_ids: torch.Tensor
    visual_rows: torch.Tensor
    query_start: int
    input_ids: list | None = None        # the token ids (visual rows hold the placeholder id)
    deepstack: list | None = None        # Qwen3-VL: the pruned deepstack levels, [n, D] each


def option_token_ids(tok, letters) -> list[list[int]]:
    """Per option letter, the single-token ids of 'A' and ' A' (where they are single tokens that
    decode back to the letter). A letter with neither cannot be scored (its probability, hence the
    entropy over the options, would be undefined): InputError naming it."""
    out = []
    for letter in letters:
        ids = {t[0] for v in (letter, " " + letter)
               if len(t := tok.encode(v, add_special_tokens=False)) == 1
               and tok.decode(t).strip() == letter}
        if not ids:
            raise InputError(f"option letter {letter!r} is not a single token of this model's tokenizer, "
                             f"so the answer's probability over the options cannot be read: give fewer "
                             f"options, or ask without options (an open question)")
        out.append(sorted(ids))
    return out


def load_pretrained(model_cls_name: str, path: Path, dtype, device, attn_implementation: str,
                    options=None):
    """(model on device, processor) from a local folder: safetensors only, no remote code.
    `options` (loading.LoadOptions): where the weights go when not on one device (accelerate's
    device_map, tensor parallel under torchrun) and how they are stored (quantization); a model
    placed by from_pretrained itself is not moved afterwards."""
    import transformers
    from transformers import AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the folder is incomplete
        raise ModelLoadError(f"model folder {str(path)!r}: its processor/tokenizer files could "
                             f"not be loaded ({type(e).__name__}: {e}); copy the tokenizer and "
                             f"preprocessor files next to config.json") from None
    cls = getattr(transformers, model_cls_name, None)
    if cls is None:
        raise ModelLoadError(f"model folder {str(path)!r}: this transformers "
                             f"({transformers.__version__}) has no {model_cls_name}; upgrade "
                             f"transformers")
    extra = options.pretrained_kwargs(device, dtype) if options is not None else {}
    try:
        model = cls.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation,
                                    local_files_only=True, use_safetensors=True,
                                    trust_remote_code=False, **extra)
    except AdaptTokenError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"model folder {str(path)!r}: weights could not be loaded "
                             f"({type(e).__name__}: {e})") from None
    if options is not None and options.quantization == "fp8":
        from .quant import after_load
        after_load(model, "fp8")       # placed on the device by from_pretrained, converted there
    if options is not None and options.places_itself:
        return model, processor
    return model.to(device), processor


def reference_layer(num_layers: int, fraction: float) -> int:
    return min(num_layers - 1, round(num_layers * fraction))


class TextModelFacts:
    """The language model inside `self.model` (transformers' `model.model.language_model` in every
    family here), its depth and the default probe layer at `reference_layer_fraction` of it."""
    reference_layer_fraction = 0.7       # ~0.7 of the depth: a guess unless the family says otherwise

    @property
    def text_model(self):
        return self.model.model.language_model

    @property
    def num_layers(self) -> int:
        return len(self.text_model.layers)

    @property
    def default_layer(self) -> int:
        return reference_layer(self.num_layers, self.reference_layer_fraction)


class FamilyAdapter(TextModelFacts, FusedTextAdapter, Adapter):
    """Shared forward / generate / prompt logic; subclasses build the sequence and the features."""
    model_class_name = ""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.config = model.config
        self.install_fused_text()        # compiled RMSNorm / SiLU-MLP calls on CUDA (fused_text.py)

    @classmethod
    def from_folder(cls, path: Path, dtype: torch.dtype, device: torch.device,
                    attn_implementation: str = "sdpa", options=None):
        return cls(*load_pretrained(cls.model_class_name, path, dtype, device, attn_implementation,
                                    options))

    # -- shape facts ---------------------------------------------------------------------------
    @property
    def video_token(self) -> str:
        return self.processor.video_token

    def _encode_text(self, s: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(s, add_special_tokens=False), dtype=torch.long)

    def _embed(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(ids)

    # -- prompt --------------------------------------------------------------------------------
    def build_prompt(self, question: Question) -> Prompt:
        """The chat template with one video item, split at the video placeholder token."""
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"},
                                          {"type": "text", "text": question.prompt_text()}]}],
            add_generation_prompt=True, tokenize=False)
        if text.count(self.video_token) != 1:
            from ..errors import InputError, ModelLoadError
            raise ModelLoadError(f"the model's chat template puts {text.count(self.video_token)} "
                                 f"video placeholders ({self.video_token!r}) in a one-video prompt; "
                                 f"expected exactly one: check chat_template in the model folder")
        pre, suf = text.split(self.video_token)
        opt = option_token_ids(self.tokenizer, question.letters) if question.is_multiple_choice else None
        return Prompt(question, self._encode_text(pre), self._encode_text(suf), opt)

    # -- the family's part ---------------------------------------------------------------------
    def _sequence(self, prompt: Prompt, embeds: torch.Tensor, coords: torch.Tensor,
                  extent: int) -> Sequence:
        raise NotImplementedError

    def _context(self, seq: Sequence):
        """Extra context around the model call (Qwen3-VL injects its deepstack features)."""
        import contextlib
        return contextlib.nullcontext()

    # -- language model ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, prompt, embeds, coords, extent, probe_layer=None, aggregation="max",
                hooks: Hooks = NO_HOOKS) -> ForwardOut:
        seq = self._sequence(prompt, embeds, coords, extent)
        x, pos = seq.embeds, seq.position_ids
        kw = dict(inputs_embeds=x, position_ids=pos, use_cache=False, logits_to_keep=1)
        with _LayerCancel(self.text_model.layers, hooks), self._context(seq):
            if probe_layer is None:
                return ForwardOut(self.model(**kw).logits[0, -1].float())
            with AttentionProbe(self.text_model.layers[probe_layer].self_attn) as probe:
                logits = self.model(**kw).logits[0, -1]
        q_idx = torch.arange(seq.query_start, x.shape[1], device=x.device)
        attn = probe.attention(q_idx)
        attn = attn[..., seq.visual_rows.to(attn.device)]
        return ForwardOut(logits.float(), token_scores(attn, aggregation, self.tp_group)[0])

    def eos_token_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]):
            if e is not None:
                ids.add(int(e))
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id:
            ids.add(im_end)
        return sorted(ids)

    @torch.inference_mode()
    def generate(self, prompt, embeds, coords, extent, max_new_tokens=32, do_sample=False,
                 temperature=1.0, top_p=1.0, seed=0, hooks: Hooks = NO_HOOKS,
                 return_logits=True) -> Generation:
        tok = self.tokenizer
        seq = self._sequence(prompt, embeds, coords, extent)
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_ids()[0]
        return generate_from_embeds(
            self.model, tok, self.text_model.layers, seq.embeds, seq.position_ids,
            pad_token_id=pad, eos_token_id=self.eos_token_ids(), hooks=hooks,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_p=top_p, seed=seed, return_logits=return_logits, context=self._context(seq))


def video_processor_kwargs(vp) -> dict:
    """Extra kwargs some processor versions need to stay quiet and per-frame (5.23's Qwen3-VL cap)."""
    params = inspect.signature(vp._preprocess).parameters
    return {"cap_pixels_per_frame": False} if "cap_pixels_per_frame" in params else {}


def slice_runs(coords: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive tokens of one slice: a new slice starts where t_pos
    changes or the (row, col) raster order does not increase (tokens come in temporal order)."""
    n = coords.shape[1]
    if n == 0:
        return []
    c = coords.cpu()
    t, r, col = c[0], c[1], c[2]
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = (t[1:] != t[:-1]) | (r[1:] < r[:-1]) | ((r[1:] == r[:-1]) & (col[1:] <= col[:-1]))
    starts = torch.nonzero(new).flatten().tolist() + [n]
    return list(zip(starts[:-1], starts[1:]))


class _LayerCancel:
    """Pre-hooks on every decoder layer that raise Cancelled when the user cancels."""

    def __init__(self, layers, hooks: Hooks):
        self.layers, self.hooks, self.handles = layers, hooks, []

    def __enter__(self):
        if self.hooks.cancelled is not None:
            self.handles = [layer.register_forward_pre_hook(lambda *a: self.hooks.check())
                            for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def generate_from_embeds(model, tok, layers, x, pos, *, pad_token_id, eos_token_id, hooks: Hooks,
                         max_new_tokens, do_sample, temperature, top_p, seed, return_logits,
                         context=None) -> Generation:
    """transformers' generate on prepared input embeddings and position ids (every adapter's
    answer): greedy or sampled, streamed to `hooks.on_text`, cancellable between layers and steps.
    `context`: a context manager held around the call (Qwen3-VL's deepstack inputs)."""
    from contextlib import nullcontext

    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class _Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            stop = hooks.cancelled is not None and hooks.cancelled()
            return torch.full((input_ids.shape[0],), bool(stop), device=input_ids.device)

    class _Stream(BaseStreamer):
        def __init__(self):
            self.ids = []

        def put(self, value):
            if value.dim() > 1 or value.numel() > 1:
                return          # generate first hands over the prompt (empty here)
            self.ids.append(int(value.reshape(-1)[0]))
            if hooks.on_text is not None:
                hooks.on_text(tok.decode(self.ids, skip_special_tokens=True))

        def end(self):
            pass

    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
              eos_token_id=eos_token_id, output_logits=return_logits, return_dict_in_generate=True,
              stopping_criteria=StoppingCriteriaList([_Cancel()]))
    if do_sample:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    with _LayerCancel(layers, hooks), (context if context is not None else nullcontext()):
        out = model.generate(inputs_embeds=x, position_ids=pos,
                             attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device),
                             streamer=_Stream() if hooks.on_text else None, **kw)
    if hooks.cancelled is not None and hooks.cancelled():
        raise Cancelled("generation cancelled by the user")
    ids = out.sequences[0].tolist()
    logits = [lg[0].float() for lg in out.logits] if return_logits else []
    return Generation(tok.decode(ids, skip_special_tokens=True).strip(), ids, logits)


def run_fast_tower(adapter, forward):
    """``forward(compile)`` for a family's fast vision tower, honouring ``adapter.compile_vision``
    (None: the tower's default, compiled on CUDA; True: compile; False: eager). When a forced compile
    fails it logs a warning, sets ``compile_vision = False`` and runs eagerly: compiling is an option,
    the eager tower is the product."""
    if adapter.compile_vision:
        try:
            return forward(True)
        except Exception as e:  # noqa: BLE001
            import logging
            logging.getLogger(__name__).warning(
                "torch.compile of the vision tower failed (%s: %s); running it eagerly",
                type(e).__name__, str(e)[:300])
            adapter.compile_vision = False
    return forward(None if adapter.compile_vision is None else False)


def resize_exact(frames: torch.Tensor, device, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] on `device` at exactly `size` (h, w): bicubic, antialiased, as
    the Qwen processors resize (they cannot be told an exact size themselves)."""
    h, w = size
    fr = frames.to(device)
    if tuple(fr.shape[1:3]) != (h, w):
        import torchvision.transforms.v2.functional as tvF
        fr = tvF.resize(fr.permute(0, 3, 1, 2), [h, w],
                        interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        fr = fr.permute(0, 2, 3, 1).contiguous()
    return fr
