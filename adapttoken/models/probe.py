"""The attention probe: how much the question attends to each visual token, at one decoder layer.

We never switch the model to eager attention (it would cost layers*heads*L^2 memory and ~11x the
time). A forward pre-hook on layer L's self-attention captures its already-normalised input and the
rotary tables; we recompute q for the query rows (every token after the visual span) and k for all
rows with the layer's own projections, apply RoPE, group heads for GQA, scale, causal-mask and
softmax in float32 over all keys, then keep the visual columns. Memory: heads * n_query * L floats.
The score of a visual token is the max (FlexSelect, default) or mean over heads and query tokens.
Every family adapter runs it inside its forward; rank.py asks for it group by group.
"""
from __future__ import annotations

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
    the bundled tiny model (training/train_tiny.py) uses it with gradients for its auxiliary probe loss."""
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


def token_scores(attn: torch.Tensor, aggregation: str = "max", group=None) -> torch.Tensor:
    """[B, heads, n_q, n_vis] attention -> one score per visual token [B, n_vis].

    group: under tensor parallel each rank holds an equal share of the heads (transformers'
    colwise q/k projections), so the heads of all ranks are combined over this process group:
    the max of the ranks' maxima, or the mean of their means (equal head counts); every rank gets
    the same scores, as one process would compute them over all heads."""
    if aggregation == "max":
        out = attn.amax(dim=(1, 2))
    elif aggregation == "mean":
        out = attn.mean(dim=(1, 2))
    else:
        raise ValueError(f"aggregation={aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    if group is not None:
        import torch.distributed as dist
        out = out.contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.MAX if aggregation == "max" else dist.ReduceOp.SUM,
                        group=group)
        if aggregation == "mean":
            out = out / dist.get_world_size(group)
    return out
