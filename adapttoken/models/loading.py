"""Model loading: the supported families (registry), detecting a folder's family, loading it from
local disk (safetensors only), the explicit download, and `Model` (an adapter plus its features)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, ModelLoadError
from ..features import SliceFeatures
from .base import Adapter


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


@dataclass
class LoadOptions:
    """How a model's weights are placed and stored, beyond "all of it on one device":

    - `device_map="auto"`: one process spreads the layers over the GPUs it sees (then the host's
      memory) through accelerate; activations follow each layer's device, so do the probe and the
      pruned forward (the adapter's `device` is where the input embeddings live);
    - `layout` with `layout.tp > 1` (under torchrun): transformers' tensor parallel, each rank of a
      copy holding a share of every layer's heads and MLP (distributed.py);
    - `quantization`: how the language model's weights are stored (bitsandbytes), None = as `dtype`.
    """
    device_map: str | dict | None = None
    layout: object = None
    quantization: str | None = None

    @property
    def tensor_parallel(self) -> bool:
        return self.layout is not None and getattr(self.layout, "tp", 1) > 1

    @property
    def places_itself(self) -> bool:
        """True when from_pretrained puts the weights where they go (no .to(device) afterwards)."""
        return bool(self.device_map) or self.tensor_parallel or bool(self.quantization)

    def check(self) -> None:
        from . import quant
        self.quantization = quant.normalize(self.quantization)
        if self.quantization and self.tensor_parallel:
            raise InputError(f"quantization={self.quantization!r} and tensor parallel (--tp) exclude "
                             f"each other: use one of them")
        if self.device_map not in (None, "auto") and not isinstance(self.device_map, dict):
            raise InputError(f"device_map={self.device_map!r}: use 'auto' (accelerate places the "
                             f"layers over the GPUs, then the host), a dict of module name -> device "
                             f"(accelerate's format), or leave it unset")
        if self.device_map and self.tensor_parallel:
            raise InputError("device_map='auto' and tensor parallel (--tp) exclude each other: "
                             "use --tp under torchrun, or device_map='auto' in one process")

    def pretrained_kwargs(self, device: torch.device, dtype: torch.dtype | None = None) -> dict:
        """Extra keyword arguments of from_pretrained (`dtype`: the compute dtype of quantized
        weights)."""
        self.check()
        kw: dict = {}
        if self.quantization:
            from . import quant
            kw.update(quant.pretrained_kwargs(self.quantization, dtype or torch.bfloat16, device,
                                              self.device_map))
        if self.device_map:
            _need_accelerate("device_map")
            kw["device_map"] = self.device_map
        if self.tensor_parallel:
            kw.update(tp_pretrained_kwargs(self.layout.tp))
        return kw


def tp_pretrained_kwargs(tp: int) -> dict:
    """from_pretrained's arguments for tensor parallel over `tp` processes (the whole torchrun
    world: distributed.init): transformers' own plan (`base_model_tp_plan`) through its
    DistributedConfig."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        import transformers
        raise InputError(f"tensor parallel needs transformers' DistributedConfig (5.17 or newer); "
                         f"this is transformers {transformers.__version__}: upgrade it") from None
    return {"distributed_config": DistributedConfig(tp_size=int(tp))}


def _need_accelerate(what: str) -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise InputError(f"{what} needs the accelerate package: pip install accelerate") from None


def load_adapter(path: str | Path, dtype: str | torch.dtype | None = "auto",
                 device: str | torch.device | None = "auto",
                 attn_implementation: str = "sdpa", options: LoadOptions | None = None) -> Adapter:
    """Load a model folder from local disk (safetensors only, never remote code, never the network)."""
    family = detect_family(path)
    check_weights(path)
    if options is not None:
        options.check()
        if options.tensor_parallel:
            device = options.layout.device
    dev = resolve_device(device)
    adapter = _families()[family].from_folder(Path(path), resolve_dtype(dtype, dev), dev,
                                              attn_implementation, options)
    if options is not None and options.tensor_parallel:
        attach_tensor_parallel(adapter, options.layout)
    return adapter


def attach_tensor_parallel(adapter: Adapter, layout) -> None:
    """What an adapter over a tensor-parallel model needs after loading (a model folder here, the
    benchmark's random build in bench/gpu_measure.py): the probe combines the heads of the ranks in
    `layout.tp_group`, and our compiled norm/MLP kernels, which assume whole layers, are off."""
    adapter.tp_group = layout.tp_group
    if hasattr(adapter, "fuse_text"):
        adapter.fuse_text = False


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
        key = video.key
        if key not in self._features:
            while len(self._features) >= self.max_cached_videos:
                self._features.pop(next(iter(self._features))).release()
            self._features[key] = SliceFeatures(self.adapter, video)
        return self._features[key]

    def release_read_ahead(self, video) -> None:
        """After a question's group passes: free a prefix read-ahead that no pass took."""
        feats = self._features.get(getattr(video, "key", None))
        if feats is not None and feats.prefix_kv is not None:
            feats.prefix_kv.release_ahead()

    def clear_cache(self) -> None:
        for f in self._features.values():
            f.release()
        self._features.clear()

    def held_bytes(self) -> dict[str, int]:
        """Bytes the caches of every video hold now, per device (SliceFeatures.held_bytes)."""
        out: dict[str, int] = {}
        for f in self._features.values():
            for dev, n in f.held_bytes().items():
                out[dev] = out.get(dev, 0) + n
        return out

    def free_memory(self, device=None) -> int:
        """Drop the caches held on `device` (all when None), keeping the videos' stores usable;
        the bytes freed."""
        return sum(f.free_memory(device) for f in self._features.values())


def load_model(path: str | Path, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto", attn_implementation: str = "sdpa", *,
               device_map: str | dict | None = None, layout=None,
               quantization: str | None = None) -> Model:
    """Load a local model folder as a `Model` (see load_adapter). `device_map="auto"`: layers spread
    over the GPUs by accelerate in this process; `layout` (distributed.init(tp=N) under torchrun):
    tensor parallel when its tp > 1; `quantization`: "nf4" or "int8" (bitsandbytes weights for the
    language model, computed in `dtype`; "none"/None: as `dtype`; models/quant.py)."""
    from .quant import normalize
    quantization = normalize(quantization)
    opts = None
    if device_map or layout is not None or quantization:
        opts = LoadOptions(device_map=device_map, layout=layout, quantization=quantization)
    return Model(load_adapter(path, dtype, device, attn_implementation, opts), name=Path(path).name)
