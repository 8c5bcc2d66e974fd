"""Attention rank: how much the question attends to each visual token, at one decoder layer.

We never switch the model to eager attention (it would cost layers*heads*L^2 memory and ~11x the
time). A forward pre-hook on layer L's self-attention captures its already-normalised input and the
rotary tables; we recompute q for the query rows (every token after the visual span) and k for all
rows with the layer's own projections, apply RoPE, group heads for GQA, scale, causal-mask and
softmax in float32 over all keys, then keep the visual columns. Memory: heads * n_query * L floats.
The score of a visual token is the max (FlexSelect, default) or mean over heads and query tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

AGGREGATIONS = ("max", "mean")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AttentionProbe:
    """Context manager: `with AttentionProbe(attn_module) as p: model(...)`, then p.attention(...).

    Captures the first call only (the prefill), so it also works around generation loops."""

    def __init__(self, attn: torch.nn.Module):
        self.attn = attn
        self.hidden = self.cos = self.sin = None

    def _hook(self, module, args, kwargs):
        if self.hidden is None:
            self.hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.cos, self.sin = kwargs["position_embeddings"]

    def __enter__(self) -> "AttentionProbe":
        self._handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @torch.no_grad()
    def attention(self, q_idx: torch.Tensor, k_slice: slice | None = None) -> torch.Tensor:
        """Softmax attention probabilities [B, heads, n_q, L] (float32, causal) of rows q_idx,
        optionally restricted to the key columns `k_slice` after the softmax."""
        if self.hidden is None:
            raise RuntimeError("the probed layer did not run: check the layer index")
        return probe_attention(self.attn, self.hidden, self.cos, self.sin, q_idx, k_slice)


def probe_attention(attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    q_idx: torch.Tensor, k_slice: slice | None = None) -> torch.Tensor:
    """The probe's recomputation (see AttentionProbe.attention), differentiable: the training of
    the bundled tiny model (train_tiny.py) uses it with gradients for its auxiliary probe loss."""
    a, x = attn, hidden
    B, L, _ = x.shape
    hd = a.head_dim
    q_idx = q_idx.to(x.device)
    q = a.q_proj(x[:, q_idx]).view(B, len(q_idx), -1, hd)
    k = a.k_proj(x).view(B, L, -1, hd)
    if hasattr(a, "q_norm"):                      # Qwen3-style per-head norm before RoPE
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)   # [B,H,nq,hd], [B,Hkv,L,hd]
    q = q * cos[:, None, q_idx] + _rotate_half(q) * sin[:, None, q_idx]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    hkv = k.shape[1]
    g = q.shape[1] // hkv                         # GQA: query head h uses kv head h // g
    q = q.reshape(B, hkv, g, len(q_idx), hd).float()
    s = torch.einsum("bkgqd,bkld->bkgql", q, k.float()) * a.scaling
    causal = torch.arange(L, device=x.device).view(1, -1) > q_idx.view(-1, 1)
    s = s.masked_fill(causal, float("-inf"))
    p = s.softmax(-1).reshape(B, hkv * g, len(q_idx), L)
    return p if k_slice is None else p[..., k_slice]


def token_scores(attn: torch.Tensor, aggregation: str = "max") -> torch.Tensor:
    """[B, heads, n_q, n_vis] attention -> one score per visual token [B, n_vis]."""
    if aggregation == "max":
        return attn.amax(dim=(1, 2))
    if aggregation == "mean":
        return attn.mean(dim=(1, 2))
    raise ValueError(f"aggregation={aggregation!r}: use one of {', '.join(AGGREGATIONS)}")


@dataclass
class GroupPass:
    """What one group pass produced: its token ids, their scores, the last-position logits."""
    group: int
    gids: torch.Tensor          # [n] global token ids (slice * tokens_per_slice + row * cols + col)
    scores: torch.Tensor        # [n] float32 attention scores
    logits: torch.Tensor        # [V] float32 logits of the first answer token
    greedy_logits: list         # logits of further greedy tokens (open-ended entropy over m tokens)
    seconds: float = 0.0


class RankedGroups:
    """Lazy attention ranking of every group: nothing runs until a consumer asks for a group.
    Results are memoised, so re-allocating a budget re-runs no group pass."""

    def __init__(self, model, groups, question, layer: int | None = None, aggregation: str = "max"):
        from .models.base import Question
        if aggregation not in AGGREGATIONS:
            from .errors import InputError
            raise InputError(f"aggregation={aggregation!r} is not known: use max or mean")
        self.model, self.groups = model, groups
        self.question = question if isinstance(question, Question) else Question(str(question))
        adapter = model.adapter
        n_layers = adapter.num_layers
        self.layer = adapter.default_layer if layer is None or layer < 0 else int(layer)
        if self.layer >= n_layers:
            from .errors import InputError
            raise InputError(f"layer={self.layer} is out of range: the model has {n_layers} layers "
                             f"(0..{n_layers - 1})")
        self.aggregation = aggregation
        self.prompt = adapter.build_prompt(self.question)
        self._memo: dict[tuple[int, int], GroupPass] = {}

    @property
    def features(self):
        return self.model.features_for(self.groups.video)

    def __len__(self) -> int:
        return len(self.groups)

    def run(self, g: int, greedy_tokens: int = 1, hooks=None) -> GroupPass:
        """The pass of group g (memoised). greedy_tokens > 1 also decodes that many greedy tokens
        and keeps their logits (for the open-ended mean entropy)."""
        import time

        from .models.base import NO_HOOKS
        hooks = hooks or NO_HOOKS
        key = (g, greedy_tokens)
        if key in self._memo:
            return self._memo[key]
        feats = self.features
        slices = self.groups.slices[g]
        embeds, coords, gids = feats.tokens_of_slices(slices, hooks=hooks)
        hooks.check()
        t0 = time.perf_counter()
        adapter = self.model.adapter
        extent = feats.extent_of(slices)
        kw = {}
        kv = getattr(feats, "prefix_kv", None)
        if kv is not None and getattr(adapter, "supports_prefix_cache", False):
            kw["prefix_cache"] = (kv, (tuple(np.sort(slices).tolist()),
                                       tuple(self.prompt.prefix_ids.tolist())))
        out = adapter.forward(self.prompt, embeds, coords, extent, probe_layer=self.layer,
                              aggregation=self.aggregation, hooks=hooks, **kw)
        extra = []
        if greedy_tokens > 1:
            gen = adapter.generate(self.prompt, embeds, coords, extent, max_new_tokens=greedy_tokens,
                                   hooks=hooks, return_logits=True)
            extra = gen.step_logits[1:]
        feats.timer.add("group_pass", time.perf_counter() - t0, sync=adapter.device)
        res = GroupPass(g, gids, out.scores, out.logits, extra, time.perf_counter() - t0)
        self._memo[key] = res
        return res
