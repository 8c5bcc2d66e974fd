"""The small protocol a model family implements (`Adapter`) and the prompt and output types.

A family adapter turns frames into per-slice visual tokens, builds the prompt around them, runs the
language model on any subset of those tokens at their full-video positions (optionally probing the
attention at one layer), and generates the answer. Everything else in the library is family-free.
Which families exist and how a folder is loaded is loading.py's.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..question import NO_HOOKS, Hooks, Question


@dataclass
class Prompt:
    """A tokenised question: text before the visual tokens (ending with the vision-start token),
    text after them (from the vision-end token to the assistant prefix), option-letter token ids."""
    question: Question
    prefix_ids: torch.Tensor
    suffix_ids: torch.Tensor
    option_token_ids: list[list[int]] | None = None


@dataclass
class ForwardOut:
    """Last-position logits [V] (float32) and, when probed, one score per visual token [n]."""
    logits: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    step_logits: list                   # [V] float32 raw logits of each generated position


class Adapter(ABC):
    """What the method needs from a model family (ALGORITHM.md, last section)."""
    family: str = ""
    frames_per_slice: int = 1
    # Leading feature dims of encode()'s output that are the LLM's visual input embedding; the
    # rest are family extras cached and pruned with them (Qwen3-VL's deepstack levels). None: all.
    main_dim: int | None = None
    model: torch.nn.Module
    processor: object
    # tensor parallel (distributed.py): the process group whose ranks each hold a share of the
    # heads; the probe combines its scores over it. None: this process holds every head.
    tp_group = None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (with accelerate's device_map the
        layers sit on several devices; an offloaded embedding's execution device)."""
        if getattr(self.model, "hf_device_map", None):
            emb = self.model.get_input_embeddings()
            if emb.weight.device.type != "meta":
                return emb.weight.device
            dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
            if dev is not None:
                return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the first floating-point parameter's (bitsandbytes stores quantized
        weights as uint8/int8, fp8 as float8; the layers around them keep the load dtype)."""
        return next(p.dtype for p in self.model.parameters()
                    if p.is_floating_point() and p.dtype.itemsize > 1)   # not float8 weights

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def default_layer(self) -> int:
        """The reference layer for the attention probe when the user gives none."""

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @abstractmethod
    def resized_size(self, height: int, width: int, min_pixels: int | None,
                     max_pixels: int | None) -> tuple[int, int]:
        """Pixel (height, width) each frame is resized to."""

    @abstractmethod
    def token_grid(self, resized: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of LLM tokens per slice at that pixel size."""

    @abstractmethod
    def encode(self, frames: torch.Tensor, resized: tuple[int, int]) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] (N a multiple of frames_per_slice) -> [N/fps, rows*cols, D]."""

    @abstractmethod
    def build_prompt(self, question: Question) -> Prompt: ...

    @abstractmethod
    def time_positions(self, slice_times: torch.Tensor) -> torch.Tensor:
        """Temporal position of each slice from its time in seconds since the first sampled frame."""

    @abstractmethod
    def forward(self, prompt: Prompt, embeds: torch.Tensor, coords: torch.Tensor, extent: int,
                probe_layer: int | None = None, aggregation: str = "max",
                hooks: Hooks = NO_HOOKS) -> ForwardOut:
        """One pass over prefix + visual tokens `embeds` [n, D] at coords [3, n] (t_pos, row, col)
        + suffix, without KV cache; last-position logits and (optionally) attention scores."""

    @abstractmethod
    def generate(self, prompt: Prompt, embeds: torch.Tensor, coords: torch.Tensor, extent: int,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, hooks: Hooks = NO_HOOKS,
                 return_logits: bool = True) -> Generation: ...
