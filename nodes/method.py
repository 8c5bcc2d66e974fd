"""The method's steps, one node each: Group Split -> Attention Rank -> Entropy Score [-> Early Stop]
-> Budget Allocate, and the Uniform Frames baseline.

Rank, Score and Early Stop only build lazy library objects; Budget Allocate pulls the group passes
in order through ScoredGroups.evaluate(), so with Early Stop the groups after the stop are never
decoded, encoded or run. ComfyUI caches each node's output: a new budget re-runs only Budget
Allocate (evaluate() is memoised), a new question re-runs from Attention Rank (the vision features
stay in the model's cache).
"""
from __future__ import annotations

import json

from .comfy_api_compat import io, ui

from .. import adapttoken as at
from ..adapttoken.evidence import timeline
from . import runtime
from .text import parse_options, summary
from .types import schema


def question_of(question: str, options: str) -> at.Question:
    return at.Question((question or "").strip(), parse_options(options))


def check_question(question: str, options: str) -> bool | str:
    try:
        question_of(question, options)
    except at.InputError as e:
        return str(e)
    return True


def sliced_for(model, video) -> at.VideoHandle:
    """The video cut into the model's slices: Load Video plans 2-frame slices (Qwen's temporal
    patch); families that take one frame per slice (InternVL, LLaVA-OneVision) re-slice it."""
    fps = model.adapter.frames_per_slice
    if video.frames_per_slice == fps:
        return video
    return at.VideoHandle(video.plan, fps, video.backend, frames=video.frames)


def check_budget(budget: int) -> bool | str:
    return True if budget > 0 else f"budget={budget} must be a positive number of tokens"


class GroupSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_GroupSplit")

    @classmethod
    def execute(cls, video, group_size, layout) -> io.NodeOutput:
        with runtime.comfy_errors():
            groups = at.split_groups(video, group_size, layout)   # clamped to the video's slices
        text = groups.describe()
        return io.NodeOutput(groups, ui=ui.PreviewText(text))


class AttentionRank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_AttentionRank")

    @classmethod
    def validate_inputs(cls, question, options):
        return check_question(question, options)

    @classmethod
    def execute(cls, model, groups, question, options, layer, aggregation) -> io.NodeOutput:
        with runtime.comfy_errors():
            video = sliced_for(model, groups.video)
            if video is not groups.video:
                groups = at.split_groups(video, groups.requested_group_size or groups.group_size,
                                         groups.layout)
            ranked = at.RankedGroups(model, groups, question_of(question, options), layer, aggregation)
        return io.NodeOutput(ranked)


class EntropyScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_EntropyScore")

    @classmethod
    def execute(cls, ranked, mode, tokens) -> io.NodeOutput:
        with runtime.comfy_errors():
            return io.NodeOutput(at.score_groups(ranked, mode, tokens))


class EarlyStop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_EarlyStop")

    @classmethod
    def execute(cls, scored, threshold, min_groups, confirm=2, check_answer=True) -> io.NodeOutput:
        with runtime.comfy_errors():
            return io.NodeOutput(at.early_stop(scored, threshold, min_groups, confirm, check_answer))


class BudgetAllocate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_BudgetAllocate")

    @classmethod
    def validate_inputs(cls, budget):
        return check_budget(budget)

    @classmethod
    def execute(cls, scored, budget, relevance, tau, floor, redundancy_threshold) -> io.NodeOutput:
        model = scored.ranked.model
        with runtime.comfy_errors(model):
            model.ensure_loaded(runtime.group_step_memory(model, scored.ranked))
            scored.ranked.features.reset_stats()
            sel = at.allocate(scored, budget, relevance, tau, floor,
                              redundancy_threshold if redundancy_threshold >= 0 else None,
                              hooks=runtime.hooks())
            tl = json.dumps(timeline(sel))
        text = summary(sel)
        return io.NodeOutput(sel, text, ui={**ui.PreviewText(text).as_dict(), "timeline": [tl]})


class UniformFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_UniformFrames")

    @classmethod
    def validate_inputs(cls, question, options, budget):
        ok = check_question(question, options)
        return ok if ok is not True else check_budget(budget)

    @classmethod
    def execute(cls, model, video, question, options, budget) -> io.NodeOutput:
        with runtime.comfy_errors(model):
            sel = at.uniform_frames(model, sliced_for(model, video), question_of(question, options),
                                    budget)
            sel.features.reset_stats()
        return io.NodeOutput(sel)
