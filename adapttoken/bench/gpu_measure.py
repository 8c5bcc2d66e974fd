"""The instruments of `bench gpu`: the random full-size Qwen2.5-VL-7B (or its tiny config), the
FLOP counting (every language-model call from its real shapes; the vision tower per slice), and
the device's bf16 matmul rate and copy bandwidth that a case's compute floor is measured against.
gpu.py runs the cases with them; gpu_report.py writes what they measured."""
from __future__ import annotations

import statistics
import time

import torch

SEVEN_B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
SEVEN_B_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                      out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
# Qwen2.5-VL-72B's widths (its config.json); benchmarks run a slice of its 80 layers on one GPU
SEVENTY_TWO_B_TEXT = dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=152064)
SEVENTY_TWO_B_VISION = dict(SEVEN_B_VISION, out_hidden_size=8192)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None)
TINY_VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                   window_size=112, fullatt_block_indexes=[1])


# ----------------------------------------------------------------------------------------------
# model


def build_config(tok, text: dict, vision: dict, attn: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    from ..training.tiny import SPECIAL_TOKENS
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    q = head_dim // 2
    section = [q - 2 * (3 * q // 8), 3 * q // 8, 3 * q // 8]       # [16, 24, 24] at head_dim 128
    vocab = text["vocab_size"] or len(tok)
    if vocab < len(tok):
        raise ValueError(f"vocab {vocab} smaller than the tokenizer's {len(tok)} tokens")
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=text["hidden_size"],
                         intermediate_size=text["intermediate_size"],
                         num_hidden_layers=text["num_hidden_layers"],
                         num_attention_heads=text["num_attention_heads"],
                         num_key_value_heads=text["num_key_value_heads"],
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": section},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision["depth"], hidden_size=vision["hidden_size"],
                           intermediate_size=vision["intermediate_size"],
                           num_heads=vision["num_heads"], out_hidden_size=vision["out_hidden_size"],
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                           window_size=vision["window_size"],
                           fullatt_block_indexes=list(vision["fullatt_block_indexes"]),
                           tokens_per_second=2, hidden_act="silu"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        attn_implementation=attn, tie_word_embeddings=False,
    )


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, pixels: int, seed: int = 0,
                size: str = "7b", llm_layers: int | None = None, layout=None,
                quantization: str | None = None):
    """(Model, build seconds): random weights created directly on `device` in `dtype`. size "7b"
    or "72b" (Qwen2.5-VL's widths); llm_layers: only that many decoder layers (a slice).
    layout with tp > 1 (under torchrun): built tensor-parallel in memory, each rank creating only
    its own shard of the language model (72B in bf16 is 136.7 GiB: it is never whole anywhere,
    nor written to disk); see _build_sharded. quantization "nf4"/"int8" (one process): built by
    transformers' quantizing load over weights drawn one at a time (quant.random_quantized), so the
    bf16 model never exists: the 72B architecture fits one GPU in nf4 (about 44 GiB). Its random
    weights differ from the bf16 build's for the same seed."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..models.loading import Model, attach_tensor_parallel
    from ..models.qwen2_5_vl import Qwen25VLAdapter
    from ..training.tiny import build_processor, build_tokenizer

    t0 = time.perf_counter()
    tok = build_tokenizer()
    proc = build_processor(tok, min_pixels=pixels, max_pixels=pixels)
    text, vision = {"7b": (SEVEN_B_TEXT, SEVEN_B_VISION),
                    "72b": (SEVENTY_TWO_B_TEXT, SEVENTY_TWO_B_VISION)}[size]
    if tiny:
        text, vision = TINY_TEXT, TINY_VISION
    if llm_layers:
        text = dict(text, num_hidden_layers=int(llm_layers))
    cfg = build_config(tok, text, vision)
    torch.manual_seed(seed)
    from ..models.quant import normalize, random_quantized
    quantization = normalize(quantization)
    if layout is not None and layout.tp > 1:
        if quantization:
            from ..errors import InputError
            raise InputError("--quantization and --tp exclude each other")
        model = _build_sharded(Qwen2_5_VLForConditionalGeneration, cfg, dtype, layout)
    elif quantization:
        model, _ = random_quantized(Qwen2_5_VLForConditionalGeneration, cfg, quantization, dtype,
                                    device, seed)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2_5_VLForConditionalGeneration(cfg)
        finally:
            torch.set_default_dtype(prev)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    adapter = Qwen25VLAdapter(model, proc)
    if layout is not None and layout.tp > 1:
        attach_tensor_parallel(adapter, layout)
    _sync(device)
    name = "tiny-random" if tiny else f"qwen2.5-vl-{size}-random" + (
        f"-{llm_layers}-layers" if llm_layers else "")
    if quantization:
        name += f"-{quantization}"
    return Model(adapter, name=name), \
        time.perf_counter() - t0

def _build_sharded(cls, cfg, dtype, layout):
    """A random-weight model loaded tensor-parallel from no checkpoint: transformers' from_pretrained
    with an empty state dict creates the model on the meta device, shards it by the tp plan and
    initialises each rank's shard of every missing weight on the rank's device. The weights the
    plan does not split (the vision tower, norms) are then copied from rank 0, so every rank of the
    copy holds the same ones (their random values would differ otherwise)."""
    import torch.distributed as dist

    from ..models.loading import tp_pretrained_kwargs
    model = cls.from_pretrained(None, config=cfg, state_dict={}, dtype=dtype,
                                **tp_pretrained_kwargs(layout.tp))
    model = model.eval().requires_grad_(False)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if not hasattr(t, "to_local"):                  # not a DTensor: replicated
                dist.broadcast(t.data, src=0, group=layout.tp_group)
    return model


def _vision_modules(m) -> list:
    """The vision tower and its merger / projector of a transformers VLM (all supported families)."""
    inner = m.model
    mods = [getattr(inner, n) for n in ("visual", "vision_tower", "multi_modal_projector")
            if getattr(inner, n, None) is not None]
    return mods


def param_counts(model) -> dict:
    m = model.adapter.model
    vis = sum(p.numel() for mod in _vision_modules(m) for p in mod.parameters())
    lm = m.model.language_model
    dec_linear = sum(mod.in_features * mod.out_features for layer in lm.layers
                     for mod in layer.modules() if isinstance(mod, torch.nn.Linear))  # quantized too
    emb = m.get_input_embeddings().weight.numel()
    head = m.lm_head.weight.numel()
    total = sum(p.numel() for p in m.parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in m.parameters()]
    return {"vision": vis, "decoder_linear": dec_linear, "embedding": emb, "lm_head": head,
            "total": total, "bytes": sum(p.numel() * p.element_size() for p in m.parameters()),
            # what this process holds (less than `bytes` under tensor parallel)
            "bytes_this_rank": sum(p.numel() * p.element_size() for p in local)}


# ----------------------------------------------------------------------------------------------
# FLOP accounting


class LLMCounter:
    """Counts FLOPs of every language-model call from its real shapes (a pre-hook on the text model)."""

    def __init__(self, model):
        a = model.adapter
        self.adapter = a
        self.phase = "group_pass"
        self.text = a.text_model
        cfg = a.model.config.text_config
        self.layers = cfg.num_hidden_layers
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.vocab = cfg.vocab_size
        self.dec_linear = param_counts(model)["decoder_linear"]
        # (new tokens, past tokens, in answer, probed); a group pass with the prefix cache is two
        # calls (the prefix, then the question suffix that carries the probe), or one when cached
        self.calls: list[tuple[int, int, bool, bool]] = []
        self.passes: list[tuple[int, int]] = []   # (LLM calls, past tokens of the last) per pass
        self._h = None

    def __enter__(self):
        from ..models.compat import passed_cache

        def hook(module, args, kwargs):
            x = kwargs.get("inputs_embeds")
            if x is None:
                x = kwargs.get("input_ids")
            if x is None:
                x = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
            n = int(x.shape[1]) if x is not None else 0
            past = passed_cache(kwargs)
            p = int(past.get_seq_length()) if past is not None else 0
            self.calls.append((n, p, self.phase == "answer", False))
        self._h = self.text.register_forward_pre_hook(hook, with_kwargs=True)
        a = self.adapter
        self._orig = (a.forward, a.generate)

        def phased(fn, phase):
            def run(*args, **kw):
                prev, self.phase = self.phase, phase
                start = len(self.calls)
                try:
                    return fn(*args, **kw)
                finally:
                    self.phase = prev
                    if phase == "group_pass" and len(self.calls) > start:
                        n, p, c, _ = self.calls[-1]
                        self.calls[-1] = (n, p, c, True)       # the probe runs on the last call
                        self.passes.append((len(self.calls) - start, p))
            return run
        a.forward, a.generate = phased(a.forward, "group_pass"), phased(a.generate, "answer")
        return self

    def __exit__(self, *exc):
        self._h.remove()
        self.adapter.forward, self.adapter.generate = self._orig

    def reset(self):
        self.calls = []
        self.passes = []

    def call_flops(self, n: int, past: int) -> float:
        mm = 2.0 * self.dec_linear * n + 2.0 * self.vocab * self.hidden      # + LM head, 1 position
        attn = 4.0 * self.layers * self.heads * self.head_dim * (n * past + n * (n + 1) / 2)
        return mm + attn

    def probe_flops(self, n: int, past: int, n_query: int) -> float:
        """q projection of the query rows, k projection of every row (not when the keys come from
        the prefix cache), scores and softmax-weighted nothing (scores only)."""
        kvd = self.kv * self.head_dim
        k_proj = 2.0 * n * self.hidden * kvd if past == 0 else 0.0
        return (2.0 * n_query * self.hidden * self.heads * self.head_dim + k_proj
                + 2.0 * self.heads * n_query * (n + past) * self.head_dim)

    def split(self, n_suffix: int) -> dict:
        """FLOPs and token counts of the group passes and of the answer (prefill + new tokens)."""
        gp = [(n, p, probed) for n, p, c, probed in self.calls if not c]
        ans = [(n, p) for n, p, c, _ in self.calls if c]
        out = {
            "group_pass_calls": len(self.passes),
            "group_pass_llm_calls": len(gp),
            "group_pass_tokens": sum(n for n, _, _ in gp),
            "group_pass": sum(self.call_flops(n, p) + (self.probe_flops(n, p, max(1, n_suffix - 1))
                                                       if probed else 0.0) for n, p, probed in gp),
            "group_pass_cached_calls": sum(1 for k, p in self.passes if k == 1 and p > 0),
            "answer_calls": len(ans),
            "answer_prefill_tokens": ans[0][0] if ans else 0,
            "answer_new_tokens": max(0, len(ans) - 1) + (1 if ans else 0),
            "answer": sum(self.call_flops(n, p) for n, p in ans),
        }
        return out


def vision_flops_per_slice(model, resized) -> float:
    from ..models.qwen_vision_fast import count_flops
    cfg = model.adapter.model.config
    if cfg.model_type != "qwen2_5_vl":
        from .archs import vision_flops_per_slice as other
        return other(cfg, resized)
    vcfg = cfg.vision_config
    p = vcfg.patch_size
    grid = torch.tensor([[1, resized[0] // p, resized[1] // p]])
    return float(count_flops(vcfg, grid)["total"])


# ----------------------------------------------------------------------------------------------
# device measurements


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, n: int = 8192, iters: int = 20, dtype=torch.bfloat16) -> dict:
    """bf16 n^3 matmul rate (median of 3 timings of `iters` products, with events)."""
    if torch.device(device).type != "cuda":
        n, iters = min(n, 512), 3
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(3):
        c = a @ b
    _sync(device)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        _sync(device)
        rates.append(2.0 * n ** 3 * iters / (time.perf_counter() - t0))
    del a, b, c
    return {"n": n, "dtype": str(dtype), "flops_per_s": statistics.median(rates),
            "runs": rates}


def copy_bandwidth(device, nbytes: int = 2 * 2 ** 30) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    _sync(device)
    bw = 2.0 * nbytes * 5 / (time.perf_counter() - t0)
    del x, y
    return bw
