"""Attention rank (ALGORITHM.md step 4): one pass of the model per group, lazily, memoised; each
pass gives the group's visual tokens their attention scores (models/probe.py) and the logits of the
first answer token (entropy.py scores them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .models.probe import AGGREGATIONS
from .question import NO_HOOKS, Question


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
        if aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation={aggregation!r} is not known: use max or mean")
        self.model, self.groups = model, groups
        self.question = question if isinstance(question, Question) else Question(str(question))
        adapter = model.adapter
        n_layers = adapter.num_layers
        self.layer = adapter.default_layer if layer is None or layer < 0 else int(layer)
        if self.layer >= n_layers:
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

    def release_read_ahead(self) -> None:
        """The group passes of this question are over: let go of a prefix read-ahead no pass took
        (Lite stopping before the group it was read for). `ScoredGroups.evaluate` calls it when its
        group passes end."""
        self.model.release_read_ahead(self.groups.video)

    def run(self, g: int, greedy_tokens: int = 1, hooks=None) -> GroupPass:
        """The pass of group g (memoised). greedy_tokens > 1 also decodes that many greedy tokens
        and keeps their logits (for the open-ended mean entropy)."""
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
