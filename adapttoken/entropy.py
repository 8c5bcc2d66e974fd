"""Entropy score: how certain the model's answer is after seeing one group, and Lite's stop rule.

Multiple choice [paper]: renormalise the first answer token's probabilities over the option
letters (each letter = logsumexp over its token variants 'A' / ' A'); H in nats, max ln K.
Open-ended [ours]: entropy of the first answer token over the full vocabulary (max ln V), or the
mean over the first m greedy tokens. Low entropy = this group holds evidence.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .question import NO_HOOKS

# Lite: frames of at most this many groups after the current one are taken on the way when a read
# passes them (decode.FrameStash); a stop wastes at most their decoding.
RIDE_ALONG_GROUPS = 4

ENTROPY_MODES = ("auto", "options", "first_token", "greedy_mean")


def response_entropy(logits: torch.Tensor, option_ids: list[list[int]] | None = None):
    """Last-position logits [V] -> (H nats, H_max, option probabilities or None)."""
    logp = logits.float().log_softmax(-1)
    if option_ids is None:
        h = -(logp.exp() * logp).sum(-1)
        return float(h), math.log(logp.shape[-1]), None
    if any(len(ids) == 0 for ids in option_ids):     # logsumexp over nothing is -inf: NaN entropy
        raise ValueError("every option needs at least one token id (see option_token_ids)")
    lp = torch.stack([logp[ids].logsumexp(-1) for ids in option_ids]).log_softmax(-1)
    h = -(lp.exp() * lp).sum(-1)
    return float(h), math.log(len(option_ids)), lp.exp().tolist()


@dataclass
class GroupScore:
    """One processed group: the pass, its entropy and (for multiple choice) option probabilities."""
    group: int
    entropy: float
    entropy_max: float
    option_probs: list[float] | None
    pass_: object              # rank.GroupPass
    top: int = -1              # the answer this group favours: the most likely option (multiple
                               # choice) or first answer token id (open); -1 when not known

    @property
    def normalized(self) -> float:
        return self.entropy / self.entropy_max if self.entropy_max > 0 else 0.0


@dataclass(frozen=True)
class StopRule:
    """Lite [paper: concept; ours: rule]: stop after group g when H_g / H_max < threshold, at
    least `min_groups` groups were processed, and `confirm` of the groups processed so far were
    under the threshold with the same favoured answer as group g (`GroupScore.top`; not
    necessarily adjacent groups). The paper stops at the first confident group (confirm=1); our
    default asks for a second one that agrees, because one confident group without the evidence
    (the model sure of a wrong answer on background, 0.2% of such groups on the synthetic colour
    task) then ends the read there and the answer is lost. Evidence that lasts longer than a group
    confirms itself in the next group; evidence confined to one group makes Lite read on until a
    second group agrees or the video ends (then Lite equals AdaptToken on that question).

    Answers that need several groups (how many times did X appear, which of two events came first)
    are left to the model's own signal, not to the task: a group that shows part of the evidence
    cannot settle such a question, and a model that says so (the bundled model is trained to:
    count -> 0.6 on the count in view, the rest on larger counts; order with one event in view ->
    half on each named colour; `training/train_tiny.py`) keeps H / H_max well above the threshold
    (about 0.5-0.9) in those groups, while still below the ~1.0 of groups without evidence, which
    is what the budget split reads. Lite then reads on, and stops only where one group settles the
    answer. The rule is a pure function of the processed groups in temporal order, so replaying it
    over an ordered list gives the same stop point.

    check_answer [ours]: a model that answers from what it sees (asked "how many times did X
    appear?", a group with one event says "1", confidently) makes the rule above stop after two
    such groups although the answer needs them all. So before stopping, the answer pass is run
    over the tokens the allocation would keep from the groups processed so far (the same budget
    split, redundancy removal and answer prompt as the final answer), and Lite stops only if that
    answer favours the same option as the confirming groups (`answer_top`): on a question one group
    settles (the colour of an object seen twice) they agree; where the answer needs several groups
    (two events seen -> "2", not the groups' "1") they do not and Lite reads on. The model's own
    signals decide, without being told the task; the check costs one answer-sized pass per would-be
    stop. Under torchrun (distributed.py) only the group rule applies: the tokens of groups that
    other replicas ran are not at hand mid-read."""
    threshold: float = 0.2
    min_groups: int = 1
    confirm: int = 2
    check_answer: bool = True

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"stop threshold={self.threshold} must be within 0..1 (a share of "
                             f"the maximum entropy)")
        if self.min_groups < 1:
            raise InputError(f"min_groups={self.min_groups} must be at least 1")
        if self.confirm < 1:
            raise InputError(f"confirm={self.confirm} must be at least 1 (1 = stop at the first "
                             f"confident group, as in the paper)")

    def should_stop(self, processed: list[GroupScore]) -> bool:
        if len(processed) < self.min_groups:             # min_groups >= 1: never empty below
            return False
        last = processed[-1]
        if last.normalized >= self.threshold:
            return False
        agree = sum(1 for s in processed if s.normalized < self.threshold and s.top == last.top)
        return agree >= self.confirm


class ScoredGroups:
    """Lazy entropy scores over RankedGroups; `evaluate()` runs the group passes (in order),
    stopping early when a StopRule is attached. Groups after the stop cost nothing."""

    def __init__(self, ranked, mode: str = "auto", tokens: int = 1, stop: StopRule | None = None):
        if mode not in ENTROPY_MODES:
            raise InputError(f"entropy mode={mode!r} is not known: use one of {', '.join(ENTROPY_MODES)}")
        if tokens < 1:
            raise InputError(f"entropy tokens m={tokens} must be at least 1")
        mc = ranked.question.is_multiple_choice
        if mode == "auto":
            mode = "options" if mc else "first_token"
        if mode == "options" and not mc:
            raise InputError("entropy mode 'options' needs a multiple-choice question: add options "
                             "or use first_token / greedy_mean")
        self.ranked, self.mode, self.tokens, self.stop = ranked, mode, tokens, stop
        self._evaluated: tuple[list[GroupScore], list[int]] | None = None
        self.answer_checks: list[dict] = []   # Lite's answer checks (StopRule.check_answer)

    def with_stop(self, stop: StopRule | None) -> "ScoredGroups":
        return ScoredGroups(self.ranked, self.mode, self.tokens, stop)

    @property
    def question(self):
        return self.ranked.question

    @staticmethod
    def _favoured(logits: torch.Tensor, probs) -> int:
        """The answer a pass favours: the most likely option (`probs`, mode 'options'), else the
        most likely first token of its last-position logits."""
        return int(np.argmax(probs)) if probs is not None else int(logits.argmax())

    def answer_top(self, gids: torch.Tensor, hooks=None) -> int:
        """One answer pass over the tokens `gids` (sorted global ids) at their full-video positions,
        the final answer's form: the answer it favours, as GroupScore.top (StopRule.check_answer)."""
        hooks = hooks or NO_HOOKS
        feats = self.ranked.features
        embeds, coords = feats.tokens(gids, hooks)
        t0 = time.perf_counter()
        adapter = self.ranked.model.adapter
        out = adapter.forward(self.ranked.prompt, embeds, coords, feats.extent_of(None), hooks=hooks)
        feats.timer.add("stop_check", time.perf_counter() - t0, sync=adapter.device)
        probs = (response_entropy(out.logits, self.ranked.prompt.option_token_ids)[2]
                 if self.mode == "options" else None)
        return self._favoured(out.logits, probs)

    def score(self, g: int, hooks=None) -> GroupScore:
        m = self.tokens if self.mode == "greedy_mean" else 1
        p = self.ranked.run(g, greedy_tokens=m, hooks=hooks)
        if self.mode == "options":
            h, hmax, probs = response_entropy(p.logits, self.ranked.prompt.option_token_ids)
        else:
            hs = [response_entropy(lg)[0] for lg in [p.logits, *p.greedy_logits]]
            h, hmax, probs = sum(hs) / len(hs), math.log(p.logits.shape[-1]), None
        return GroupScore(g, h, hmax, probs, p, self._favoured(p.logits, probs))

    def adopt(self, done: list[GroupScore], skipped: list[int]) -> None:
        """Take results computed elsewhere (other processes: distributed.py) as this object's
        evaluation: `done` in temporal order, `skipped` the groups never processed."""
        self._evaluated = (list(done), list(skipped))

    def evaluate(self, hooks=None, verify=None) -> tuple[list[GroupScore], list[int]]:
        """(processed groups in order, skipped group indices). Without a stop rule every slice is
        decoded and encoded first in temporal order (sequential reading is faster). `verify`
        (StopRule.check_answer): done -> the answer the tokens chosen so far favour (answer_top);
        Lite stops only where it equals the last group's favoured answer."""
        if self._evaluated is not None:
            return self._evaluated
        self.answer_checks = []
        n = len(self.ranked)
        if self.stop is None:
            self.ranked.features.prefetch(hooks)
        done: list[GroupScore] = []
        feats = self.ranked.features
        slices = self.ranked.groups.slices
        try:
            for g in range(n):
                if hooks is not None:
                    hooks.check()
                    hooks.report("group pass", g, n)
                if self.stop is not None:   # decode group g+1 on CPU threads during group g's work
                    if g == 0:
                        feats.lookahead(slices[0])
                    if g + 1 < n:
                        feats.lookahead(slices[g + 1])
                    # reads for group g also take the next groups' frames when they lie on the way
                    # (at most RIDE_ALONG_GROUPS groups ahead: what a stop can waste)
                    nxt = slices[g + 1:g + 1 + RIDE_ALONG_GROUPS]
                    feats.ride_along(np.concatenate(nxt) if nxt else None)
                done.append(self.score(g, hooks))
                if self.stop is not None and self.stop.should_stop(done):
                    if verify is None or not getattr(self.stop, "check_answer", False):
                        break
                    top = verify(done)
                    self.answer_checks.append({"group": g, "group_top": done[-1].top, "answer_top": top})
                    if top == done[-1].top:
                        break
        finally:
            if self.stop is not None:
                feats.drop_lookahead()
            # the group passes are over: a prefix read-ahead no pass took (Lite stopping before
            # the group it was read for) is let go here, for every caller (pipeline, nodes)
            self.ranked.release_read_ahead()
        if hooks is not None:
            hooks.report("group pass", n, n)
        skipped = list(range(len(done), n))
        self._evaluated = (done, skipped)
        return self._evaluated


def score_groups(ranked, mode: str = "auto", tokens: int = 1) -> ScoredGroups:
    return ScoredGroups(ranked, mode, tokens)


def early_stop(scored: ScoredGroups, threshold: float = 0.2, min_groups: int = 1,
               confirm: int = 2, check_answer: bool = True) -> ScoredGroups:
    """Attach Lite's stop rule: the consumer then processes groups in order and stops early
    (StopRule: `confirm`=1 is the paper's first confident group; `check_answer` asks the answer
    over the tokens chosen so far to agree before a stop)."""
    return scored.with_stop(StopRule(threshold, min_groups, confirm, check_answer))
