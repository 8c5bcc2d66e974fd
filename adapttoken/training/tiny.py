"""Tiny Qwen2.5-VL models built fully offline: our own byte-level BPE tokenizer with Qwen's special
tokens and chat template, a small config of the real architecture, and a processor.

Used by the tests (random weights) and by the bundled demo model (trained weights, see train_tiny.py).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL / Qwen2.5-VL chat template (same structure as the official one).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS = [
    "You are a helpful assistant.",
    "Question: What happens in the video? Answer with the option's letter from the given choices directly.",
    "A. a dog runs\nB. a cat sleeps\nC. a man cooks\nD. a car drives",
    "The answer is A", "The answer is B", "The answer is C", "The answer is D",
    "system user assistant", "Select the best answer to the following multiple-choice question.",
    "red green blue yellow circle square triangle cross one two three four",
]


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 600):
    """Byte-level BPE trained on `corpus` -> a transformers Qwen2Tokenizer with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus) * 4, trainer)
    m = json.loads(bpe.to_str())["model"]
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    tok = Qwen2Tokenizer(vocab=m["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tok


def build_processor(tok, min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16):
    """A Qwen2.5-VL processor around `tok` with the given per-frame pixel range."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(size=size),
                               chat_template=QWEN2VL_CHAT_TEMPLATE)


def tiny_config(tok, *, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 2,
                vision_heads: int = 2, fullatt_block_indexes: tuple[int, ...] = (1,),
                attn: str = "sdpa"):
    """A small config of the real Qwen2.5-VL architecture (GQA, M-RoPE, windowed ViT, 2x2 merger)."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    q = head_dim // 2
    section = [q - 2 * (3 * q // 8), 3 * q // 8, 3 * q // 8]   # sums to head_dim/2, like [16,24,24]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=32768,
                         rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": section},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden, num_heads=vision_heads,
                           out_hidden_size=hidden, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=list(fullatt_block_indexes), tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        attn_implementation=attn, tie_word_embeddings=False,
    )


def build_tiny_model(seed: int = 0, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 600,
                     min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16, **cfg):
    """(model, processor) of a random-weight tiny Qwen2.5-VL, built offline."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = build_tokenizer(corpus, vocab_size)
    proc = build_processor(tok, min_pixels, max_pixels)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok, **cfg)).eval()
    return model, proc


def save_model_folder(path: str | Path, model, processor) -> Path:
    """Write a loadable model folder: config.json, model.safetensors, tokenizer and processor files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path
