"""The question suffix's attention over a cached prefix, through transformers' attention registry.

A group pass with the prefix key/value store (qwen2_5_vl `_forward_prefix`) ends with a pass of
the question's ~70 rows against the ~14,000 keys of the stored prefix plus their own. transformers'
sdpa path runs that with an explicit causal mask, which rules out `enable_gqa`, so it first copies
every key/value head 7 times (`repeat_kv`) and then runs a masked kernel: 0.81 ms per layer on an
H200 at the 7B's shapes. The same attention as one `scaled_dot_product_attention` call with torch's
lower-right causal bias (`torch.nn.attention.bias.causal_lower_right`: query row i sees keys
0..L-q+i) and `enable_gqa` takes 0.11 ms (PERF_NOTES item 32).

How, without touching transformers' own functions: `ATTENTION` is registered as a new attention
implementation (`AttentionInterface.register`, with sdpa's mask function under the same name,
`AttentionMaskInterface.register`) and set on the loaded model (`set_attn_implementation`). It is
transformers' `sdpa_attention_forward` everywhere, except inside `suffix_pass()`: there, for a
call of q > 1 query rows against L > q keys (the cached prefix plus the suffix), it ignores the
mask transformers built and applies the lower-right causal bias instead. That is only right for
one unpadded sequence with full causal attention, which is what `suffix_pass()` promises: the
caller wraps its suffix pass (batch 1, no padding) in it, and layers with a sliding window always
take transformers' path.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

ATTENTION = "adapttoken_sdpa"

_IN_SUFFIX = contextvars.ContextVar("adapttoken_suffix_pass", default=False)
_REGISTERED = False
# layer calls that took the lower-right path (read by tests and profile_gpu, never reset here)
stats = {"lower_right_calls": 0}


@contextlib.contextmanager
def suffix_pass():
    """Calls made inside: one unpadded sequence whose query rows come after every cached key."""
    token = _IN_SUFFIX.set(True)
    try:
        yield
    finally:
        _IN_SUFFIX.reset(token)


def _lower_right(q: int, L: int):
    """torch's lower-right causal bias, or None where its tensor subclass cannot be made (under a
    TorchDispatchMode, e.g. a memory or FLOP counter): the caller then takes transformers' path."""
    from torch.nn.attention.bias import causal_lower_right
    try:
        return causal_lower_right(q, L)
    except RuntimeError:
        return None


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q, L = query.shape[2], key.shape[2]
    if (_IN_SUFFIX.get() and 1 < q < L and not dropout and getattr(module, "sliding_window", None) is None
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and query.shape[1] % key.shape[1] == 0):
        bias = _lower_right(q, L)
        if bias is not None:
            stats["lower_right_calls"] += 1
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _REGISTERED = True


def install(model) -> bool:
    """Switch a model loaded with attn_implementation='sdpa' to ATTENTION (identical outside
    `suffix_pass()`). Returns whether it is in use; any other implementation is left alone."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(ATTENTION)
    return getattr(model.config, "_attn_implementation", None) == ATTENTION
