"""Full-size architectures of the other supported families, for GPU benchmarks with random weights.

    from adapttoken.bench.archs import ARCHS, arch_config, build_arch_model
    cfg = arch_config("qwen3-vl-8b")                      # transformers config of the released model
    model, seconds = build_arch_model("internvl3-8b", "cuda", torch.bfloat16)   # at.Model, random
    vision_flops_per_slice(model.adapter.model.config, (288, 544))         # counted tower FLOPs

`ARCHS` holds the config.json contents of the released checkpoints (Qwen/Qwen3-VL-8B-Instruct,
OpenGVLab/InternVL3-8B-hf), in transformers 5.x key names (`rope_parameters`). With `tok`,
`arch_config` points the special-token ids at that tokenizer's (the benchmarks use our small
offline tokenizer; the vocabulary keeps its full size, so the embedding and head cost the same).
`build_arch_model(..., tiny=True)` builds the tiny random model of the same family instead
(training/tiny_families.py), for CPU smoke tests of the benchmark.

Vision FLOPs (`vision_flops_per_slice`, multiply-add = 2), per slice as the adapters encode it:

- Qwen3-VL (a slice = 2 frames; N = (H/16)*(W/16) patches, D = hidden, I = MLP width, `depth`
  blocks, every block attends within the slice):
  patch embed 2*N*(3*2*16*16)*D; blocks depth * (2*N*(3D^2 + D^2 + 2*D*I) + 4*N^2*D) (qkv, proj,
  the two MLP linears, scores + weighted sum); mergers (1 + deepstack levels) * 2*(N/4)*(4D*4D +
  4D*out) (each merger: linear 4D->4D, linear 4D->out on the 2x2-merged tokens).
- InternVL (a slice = 1 frame squashed to 448x448; N = (448/14)^2 + 1 = 1025 tokens with the class
  token, D = 1024, I = 4096, 24 layers, all run: vision_feature_layer -1):
  patch embed 2*(N-1)*(3*14*14)*D; layers L * (2*N*(3D^2 + D^2 + 2*D*I) + 4*N^2*D); projector on
  the (N-1)/4 pixel-shuffled tokens 2*((N-1)/4)*(4D*Dt + Dt*Dt) (Dt = the LLM's hidden size).
- Norms, activations, softmax, rotary / position embeddings and the pixel shuffle are not counted
  (elementwise, well under 1% of the above).
"""
from __future__ import annotations

import copy
import time

import torch

QWEN3_VL_8B = {
    "model_type": "qwen3_vl",
    "text_config": {
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "vocab_size": 151936,
        "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                            "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
        "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
        "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 4096,
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
    },
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

INTERNVL3_8B = {
    "model_type": "internvl",
    "text_config": {                                    # Qwen2.5-7B
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "vocab_size": 151674, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
    },
    "vision_config": {                                  # InternViT-300M-448px-V2.5
        "model_type": "internvl_vision", "hidden_size": 1024, "num_hidden_layers": 24,
        "num_attention_heads": 16, "intermediate_size": 4096, "hidden_act": "gelu",
        "image_size": [448, 448], "patch_size": [14, 14], "attention_bias": True,
        "use_qk_norm": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
        "layer_scale_init_value": 0.1, "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,
    },
    "image_token_id": 151667, "image_seq_length": 256, "downsample_ratio": 0.5,
    "projector_hidden_act": "gelu", "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
}

ARCHS = {"qwen3-vl-8b": QWEN3_VL_8B, "internvl3-8b": INTERNVL3_8B}


def _remap(d: dict, tok) -> dict:
    """Point the special-token ids at `tok`'s."""
    from ..training.tiny import SPECIAL_TOKENS
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = d["text_config"]
    if text["vocab_size"] < len(tok):
        raise ValueError(f"vocab {text['vocab_size']} smaller than the tokenizer's {len(tok)}")
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if d["model_type"] == "qwen3_vl":
        d.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                 vision_start_token_id=ids["<|vision_start|>"],
                 vision_end_token_id=ids["<|vision_end|>"])
    elif d["model_type"] == "internvl":
        d["image_token_id"] = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    return d


def arch_config(name: str, tok=None, attn: str = "sdpa"):
    """The transformers config of architecture `name` (see ARCHS); special ids from `tok` if given."""
    if name not in ARCHS:
        raise KeyError(f"unknown architecture {name!r}: use one of {', '.join(ARCHS)}")
    d = copy.deepcopy(ARCHS[name])
    if tok is not None:
        d = _remap(d, tok)
    model_type = d.pop("model_type")
    from transformers import InternVLConfig, Qwen3VLConfig
    cls = {"qwen3_vl": Qwen3VLConfig, "internvl": InternVLConfig}[model_type]
    return cls(**d, attn_implementation=attn)


def vision_flops_per_slice(cfg, resized: tuple[int, int]) -> float:
    """Counted FLOPs of the vision tower (+ merger / projector) for one slice at `resized` pixels
    (Qwen3-VL; InternVL squashes every frame to its image size), by the formulas above.
    `cfg`: the model's transformers config (Qwen3VLConfig or InternVLConfig)."""
    mt = cfg.model_type
    v = cfg.vision_config
    if mt == "qwen3_vl":
        p, m = v.patch_size, v.spatial_merge_size
        N = (resized[0] // p) * (resized[1] // p)
        D, I, out = v.hidden_size, v.intermediate_size, v.out_hidden_size
        in_dim = v.in_channels * v.temporal_patch_size * p * p
        levels = len(getattr(v, "deepstack_visual_indexes", None) or [])
        hm = D * m * m
        return float(2 * N * in_dim * D
                     + v.depth * (2 * N * (4 * D * D + 2 * D * I) + 4 * N * N * D)
                     + (1 + levels) * 2 * (N // (m * m)) * (hm * hm + hm * out))
    if mt == "internvl":
        size = v.image_size if isinstance(v.image_size, (list, tuple)) else (v.image_size,) * 2
        patch = v.patch_size if isinstance(v.patch_size, (list, tuple)) else (v.patch_size,) * 2
        n_patch = (size[0] // patch[0]) * (size[1] // patch[1])
        N = n_patch + 1                                   # + the class token
        D, I, L = v.hidden_size, v.intermediate_size, v.num_hidden_layers
        in_dim = v.num_channels * patch[0] * patch[1]
        r = int(round(1 / cfg.downsample_ratio))
        Dt = cfg.text_config.hidden_size
        return float(2 * n_patch * in_dim * D
                     + L * (2 * N * (4 * D * D + 2 * D * I) + 4 * N * N * D)
                     + 2 * (n_patch // (r * r)) * (D * r * r * Dt + Dt * Dt))
    raise ValueError(f"no vision FLOP count for model_type {mt!r}")


def build_arch_model(name: str, device, dtype=torch.bfloat16, pixels: int = 448 * 448, seed: int = 0,
                     tiny: bool = False):
    """(at.Model with the family's adapter, seconds): random weights created on `device` in `dtype`,
    our offline tokenizer, the family's processor at full size (Qwen3-VL: `pixels` per frame).
    tiny: the family's tiny random model instead (training/tiny_families.py; CPU smoke tests)."""
    import transformers

    from ..models.loading import Model, _families
    from ..training.tiny_families import (build_family_tokenizer, internvl_processor, qwen3_vl_processor,
                                 tiny_internvl, tiny_qwen3_vl)

    t0 = time.perf_counter()
    if name not in ARCHS:
        raise KeyError(f"unknown architecture {name!r}: use one of {', '.join(ARCHS)}")
    family = ARCHS[name]["model_type"]
    tok = build_family_tokenizer(family)
    cfg = arch_config(name, tok)
    if tiny and family == "qwen3_vl":
        cfg, proc = tiny_qwen3_vl(tok, min_pixels=pixels, max_pixels=pixels)
        cls = transformers.Qwen3VLForConditionalGeneration
    elif tiny:
        cfg, proc = tiny_internvl(tok)
        cls = transformers.InternVLForConditionalGeneration
    elif family == "qwen3_vl":
        proc = qwen3_vl_processor(tok, min_pixels=pixels, max_pixels=pixels)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        proc = internvl_processor(tok, 448, 256)
        cls = transformers.InternVLForConditionalGeneration
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    adapter = _families()[family](model, proc)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return Model(adapter, name=f"{name}-{'tiny-' if tiny else ''}random"), time.perf_counter() - t0
