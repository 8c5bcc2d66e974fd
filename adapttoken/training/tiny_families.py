"""Tiny random-weight models of the other supported families, built fully offline: Qwen3-VL,
InternVL 2.5/3 (HF format) and LLaVA-OneVision, each with our byte-level BPE tokenizer
(`tiny.build_tokenizer`) plus the family's special tokens, a chat template of the same structure
as the official one, and the family's real processor classes. Used by the tests.
"""
from __future__ import annotations

import torch

from .tiny import DEFAULT_CORPUS, SPECIAL_TOKENS, build_tokenizer

FAMILY_CORPUS = list(DEFAULT_CORPUS) + [
    "Frame1: Frame2: Frame3: Frame4: Frame10: Frame12:",
    "<0.0 seconds> <1.5 seconds> <12.0 seconds> seconds",
    "user assistant\n",
]

# InternVL-hf / LLaVA-OneVision-hf chat templates (same structure as the official ones).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
LLAVA_OV_TOKENS = {"image_token": "<image>", "video_token": "<video>"}

FAMILIES = ("qwen3_vl", "internvl", "llava_onevision")


def build_family_tokenizer(family: str):
    """`tiny.build_tokenizer` plus the family's special tokens and chat template."""
    tok = build_tokenizer(FAMILY_CORPUS)
    extra = {"internvl": INTERNVL_TOKENS, "llava_onevision": LLAVA_OV_TOKENS}.get(family)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra.values())},
                               replace_extra_special_tokens=False)
        tok._set_model_specific_special_tokens(dict(extra))
    tok.chat_template = {"internvl": INTERNVL_CHAT_TEMPLATE,
                         "llava_onevision": LLAVA_OV_CHAT_TEMPLATE}.get(family, tok.chat_template)
    return tok


def _text_config(tok, hidden, layers, heads, kv_heads, **extra):
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], **extra)


# -- Qwen3-VL ------------------------------------------------------------------------------------

def tiny_qwen3_vl(tok, *, hidden=64, layers=4, heads=4, kv_heads=2, vision_depth=3,
                  deepstack=(0, 1), attn="sdpa", min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16):
    """(config, processor): patch 16, temporal patch 2, 2x2 merge (32 px per token), interleaved
    M-RoPE, q/k norms, deepstack features from the given vision layers."""
    from transformers import Qwen3VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    q = head_dim // 2
    section = [q - 2 * (q * 5 // 16), q * 5 // 16, q * 5 // 16]     # like [24, 20, 20]
    cfg = Qwen3VLConfig(
        text_config=_text_config(tok, hidden, layers, heads, kv_heads, head_dim=head_dim,
                                 rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": section,
                                                  "mrope_interleaved": True}),
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                           out_hidden_size=hidden, num_position_embeddings=64,
                           deepstack_visual_indexes=list(deepstack)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        attn_implementation=attn, tie_word_embeddings=False)
    return cfg, qwen3_vl_processor(tok, min_pixels, max_pixels)


def qwen3_vl_processor(tok, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    from .tiny import QWEN2VL_CHAT_TEMPLATE

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, patch_size=16),
                            tokenizer=tok, video_processor=Qwen3VLVideoProcessor(size=size),
                            chat_template=QWEN2VL_CHAT_TEMPLATE)


# -- InternVL ------------------------------------------------------------------------------------

def tiny_internvl(tok, *, hidden=64, layers=4, heads=4, kv_heads=2, image_size=64, patch=8,
                  vision_depth=2, attn="sdpa"):
    """(config, processor): InternViT-style tower on square frames, pixel shuffle 0.5 -> (image_size /
    patch / 2)^2 tokens per frame (16 here; 256 at 448 px / 14 for the real models), Qwen2 LLM."""
    from transformers import InternVLConfig

    cfg = InternVLConfig(
        text_config=dict(model_type="qwen2", **_text_config(tok, hidden, layers, heads, kv_heads,
                                                            rope_theta=1e6)),
        vision_config=dict(hidden_size=32, num_hidden_layers=vision_depth, num_attention_heads=2,
                           intermediate_size=64, image_size=[image_size, image_size],
                           patch_size=[patch, patch], attention_bias=True),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(image_size // patch // 2) ** 2, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        attn_implementation=attn, tie_word_embeddings=False)
    return cfg, internvl_processor(tok, image_size, (image_size // patch // 2) ** 2)


def internvl_processor(tok, image_size=448, tokens_per_frame=256):
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    sz = {"height": image_size, "width": image_size}
    return InternVLProcessor(image_processor=GotOcr2ImageProcessor(size=sz, crop_size=sz),
                             tokenizer=tok, video_processor=InternVLVideoProcessor(size=sz),
                             image_seq_length=tokens_per_frame, chat_template=INTERNVL_CHAT_TEMPLATE)


# -- LLaVA-OneVision -----------------------------------------------------------------------------

def tiny_llava_onevision(tok, *, hidden=64, layers=4, heads=4, kv_heads=2, image_size=56, patch=8,
                         vision_depth=2, attn="sdpa"):
    """(config, processor): SigLIP tower, 2-layer projector, bilinear 2x pooling of the patch grid
    -> ceil(image_size / patch / 2)^2 tokens per frame (16 here; 196 at 384 px / 14), one learned
    newline token after the video, Qwen2 LLM."""
    from transformers import LlavaOnevisionConfig

    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text_config(tok, hidden, layers, heads, kv_heads,
                                                            rope_theta=1e6)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           num_hidden_layers=vision_depth, num_attention_heads=2,
                           intermediate_size=64, image_size=image_size, patch_size=patch),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=[[image_size, image_size]],
        attn_implementation=attn, tie_word_embeddings=False)
    return cfg, llava_onevision_processor(tok, image_size, patch)


def llava_onevision_processor(tok, image_size=384, patch=14):
    from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    sz = {"height": image_size, "width": image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=sz,
                                                     image_grid_pinpoints=[[image_size, image_size]]),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=sz),
        num_image_tokens=(image_size // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_OV_CHAT_TEMPLATE)


_BUILDERS = {"qwen3_vl": tiny_qwen3_vl, "internvl": tiny_internvl,
             "llava_onevision": tiny_llava_onevision}


def model_class(family: str):
    import transformers
    return getattr(transformers, {"qwen3_vl": "Qwen3VLForConditionalGeneration",
                                  "internvl": "InternVLForConditionalGeneration",
                                  "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[family])


def build_tiny_family(family: str, seed: int = 0, **cfg):
    """(model, processor) of a random-weight tiny model of `family`, built offline."""
    tok = build_family_tokenizer(family)
    config, proc = _BUILDERS[family](tok, **cfg)
    torch.manual_seed(seed)
    return model_class(family)(config).eval(), proc
