"""The small protocol a model family implements, the question/prompt types, and model loading.

A family adapter turns frames into per-slice visual tokens, builds the prompt around them, runs the
language model on any subset of those tokens at their full-video positions (optionally probing the
attention at one layer), and generates the answer. Everything else in the library is family-free.
"""
from __future__ import annotations

import json
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, ModelLoadError

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Question:
    """A question about the video; `options` makes it multiple choice with letters A, B, C..."""
    text: str
    options: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise InputError("question is empty: type a question about the video")
        if len(self.options) == 1:
            raise InputError("options: give at least two options, or none for an open question")
        if len(self.options) > 26:
            raise InputError(f"options: {len(self.options)} given, at most 26 (A-Z) are supported")
        for i, o in enumerate(self.options):
            if not str(o).strip():
                raise InputError(f"option {string.ascii_uppercase[i]} is empty: remove it or fill it")

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(string.ascii_uppercase[: len(self.options)])

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    def prompt_text(self) -> str:
        """The user text after the video: lmms-eval's VideoMME layout for multiple choice."""
        if not self.options:
            return self.text.strip()
        opts = "\n".join(f"{L}. {o.strip()}" for L, o in zip(self.letters, self.options))
        return f"{self.text.strip()}\n{opts}\n{MC_INSTRUCTION}"


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


@dataclass
class Hooks:
    """Progress, cancel and text streaming callbacks for long work (ComfyUI plugs its own in)."""
    progress: object = None             # callable(stage: str, done: int, total: int)
    cancelled: object = None            # callable() -> bool
    on_text: object = None              # callable(text_so_far: str)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def check(self) -> None:
        from ..errors import Cancelled
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("cancelled by the user")


NO_HOOKS = Hooks()


class Adapter(ABC):
    """What the method needs from a model family (ALGORITHM.md, last section)."""
    family: str = ""
    frames_per_slice: int = 1
    # Leading feature dims of encode()'s output that are the LLM's visual input embedding; the
    # rest are family extras cached and pruned with them (Qwen3-VL's deepstack levels). None: all.
    main_dim: int | None = None
    model: torch.nn.Module
    processor: object

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _families():
    """Supported families keyed by the `model_type` of a model folder's config.json."""
    from .internvl import InternVLAdapter
    from .llava_onevision import LlavaOnevisionAdapter
    from .qwen2_5_vl import Qwen25VLAdapter
    from .qwen3_vl import Qwen3VLAdapter
    return {"qwen2_5_vl": Qwen25VLAdapter, "qwen3_vl": Qwen3VLAdapter, "internvl": InternVLAdapter,
            "llava_onevision": LlavaOnevisionAdapter}


# model_types that are close to a supported family but are not it: what to use instead
_HINTS = {
    "internvl_chat": "this is InternVL's remote-code format; use the transformers-format "
                     "checkpoint of the same model (its name ends in -hf, model_type 'internvl')",
    "qwen2_vl": "Qwen2-VL is not supported; use Qwen2.5-VL or Qwen3-VL",
    "qwen3_vl_moe": "the Qwen3-VL MoE models are not supported yet; use a dense Qwen3-VL",
}


def supported_families() -> list[str]:
    return sorted(_families())


def detect_family(path: str | Path) -> str:
    """The model_type of a local model folder, checked against the supported families."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist: put the model's files "
                             f"there or pass --model with the right folder")
    if not path.is_dir():
        raise ModelLoadError(f"model {str(path)!r} is a file, not a folder: pass the folder that "
                             f"holds config.json and the .safetensors weights")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json: it is not a "
                             f"transformers model folder")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg} is not valid JSON ({e}): re-download the model") from None
    if model_type not in _families():
        hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
        raise ModelLoadError(f"model folder {str(path)!r} holds a {model_type or 'unknown'!r} model; "
                             f"supported families: {', '.join(supported_families())}{hint}")
    return model_type


def check_weights(path: str | Path) -> list[Path]:
    """The folder's safetensors files; .bin/.pt-only checkpoints are refused (pickle can run code)."""
    path = Path(path)
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelLoadError(f"model folder {str(path)!r} has only pickle weights ({', '.join(pickled[:3])}): "
                             f"AdaptToken loads .safetensors only; convert them or download the "
                             f"safetensors version")
    raise ModelLoadError(f"model folder {str(path)!r} has no .safetensors weights: download them "
                         f"into that folder")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise InputError(f"dtype={dtype!r} is not known: use auto, bf16, fp16 or fp32")
    return table[dtype]


def load_adapter(path: str | Path, dtype: str | torch.dtype | None = "auto",
                 device: str | torch.device | None = "auto",
                 attn_implementation: str = "sdpa") -> Adapter:
    """Load a model folder from local disk (safetensors only, never remote code, never the network)."""
    family = detect_family(path)
    check_weights(path)
    dev = resolve_device(device)
    return _families()[family].from_folder(Path(path), resolve_dtype(dtype, dev), dev,
                                           attn_implementation)


def download_model(repo_id: str, dest: str | Path) -> Path:
    """Explicitly fetch a model's safetensors, configs and tokenizer from the model hub into `dest`.
    Nothing else in the library ever calls this."""
    from huggingface_hub import snapshot_download
    out = snapshot_download(repo_id, local_dir=str(dest),
                            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"])
    return Path(out)


@dataclass
class Model:
    """A loaded model plus the cache of vision features of the videos it has seen (per plan)."""
    adapter: Adapter
    name: str = ""
    max_cached_videos: int = 2
    _features: dict = field(default_factory=dict, repr=False)

    def features_for(self, video):
        """The memoised SliceFeatures of `video` (a VideoHandle) for this model."""
        from ..features import SliceFeatures
        key = video.key
        if key not in self._features:
            while len(self._features) >= self.max_cached_videos:
                self._features.pop(next(iter(self._features))).release()
            self._features[key] = SliceFeatures(self.adapter, video)
        return self._features[key]

    def clear_cache(self) -> None:
        for f in self._features.values():
            f.release()
        self._features.clear()


def load_model(path: str | Path, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto", attn_implementation: str = "sdpa") -> Model:
    """Load a local model folder as a `Model` (see load_adapter)."""
    return Model(load_adapter(path, dtype, device, attn_implementation), name=Path(path).name)
