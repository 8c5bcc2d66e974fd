"""MLLM Answer: one pass over the selected tokens, text streamed onto the node as it is generated."""
from __future__ import annotations

import json
import time

from .comfy_api_compat import io

from .. import adapttoken as at
from ..adapttoken.evidence import timeline
from . import runtime
from .method import sliced_for
from .text import parse_question_list
from .types import schema


class MLLMAnswer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_MLLMAnswer")

    @classmethod
    def execute(cls, selection, max_new_tokens, do_sample, temperature, top_p, seed) -> io.NodeOutput:
        model = runtime.owner_of(selection.features.adapter)
        with runtime.comfy_errors(model):
            if model is not None:
                model.ensure_loaded(runtime.answer_memory(model, selection, max_new_tokens))
            selection.features.timer.seconds.pop("answer", None)   # this run's time only
            res = at.answer(selection, max_new_tokens, do_sample, temperature, top_p, seed,
                            hooks=runtime.hooks(cls.hidden.unique_id))
        if model is not None and not model.keep_loaded:
            model.offload()
        probs = json.dumps(res.option_probs or {})
        stats = {k: v for k, v in res.to_dict().items() if k not in ("answer", "groups", "kept_tokens")}
        with runtime.comfy_errors(model):
            tl = json.dumps(timeline(selection))
        return io.NodeOutput(res.answer, probs, res.to_json(),
                             ui={"text": [res.answer], "option_probs": [probs], "stats": [json.dumps(stats)],
                                 "timeline": [tl]})


class AskMany(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_AskMany")

    @classmethod
    def validate_inputs(cls, questions, budget):
        items = parse_question_list(questions)
        if not items:
            return "questions is empty: type one question per block (blocks separated by a blank line)"
        for n, (q, opts) in enumerate(items, 1):
            try:
                at.Question(q, opts)
            except at.InputError as e:
                return f"question {n} ({q[:40]!r}): {e}"
        if budget < 1:
            return f"budget={budget} must be at least 1"
        return True

    @classmethod
    def execute(cls, model, groups, questions, method, budget, max_new_tokens) -> io.NodeOutput:
        items = parse_question_list(questions)
        hooks = runtime.hooks(cls.hidden.unique_id)
        rows = []
        with runtime.comfy_errors(model):
            for n, (text, opts) in enumerate(items, 1):
                q = at.Question(text, opts)
                t0 = time.perf_counter()
                if method == "uniform":
                    video = sliced_for(model, groups.video)
                    model.features_for(video).reset_stats()
                    sel = at.uniform_frames(model, video, q, budget)
                else:
                    ranked = at.RankedGroups(model, groups, q)
                    model.ensure_loaded(runtime.group_step_memory(model, ranked))
                    ranked.features.reset_stats()
                    scored = at.score_groups(ranked)
                    if method == "even_split":
                        sel = at.even_split(scored, budget, hooks=hooks)
                    else:
                        if method == "lite":
                            scored = at.early_stop(scored)
                        sel = at.allocate(scored, budget, hooks=hooks)
                model.ensure_loaded(runtime.answer_memory(model, sel, max_new_tokens))
                res = at.answer(sel, max_new_tokens, hooks=hooks)
                rows.append({"id": n, "question": text, "options": list(opts), "answer": res.answer,
                             "option_probs": res.option_probs,
                             "seconds": round(time.perf_counter() - t0, 3),
                             "decoded_frames": res.decoded_frames, "evidence": res.evidence[:3]})
        if not model.keep_loaded:
            model.offload()
        lines = [f"{r['id']:>3}  {r['answer']!r}  {r['seconds']:.2f} s  {r['question'][:60]}"
                 for r in rows]
        if len(rows) > 1:
            later = sum(r["seconds"] for r in rows[1:]) / (len(rows) - 1)
            lines.append(f"first {rows[0]['seconds']:.2f} s, later questions {later:.2f} s on average "
                         f"({later / max(rows[0]['seconds'], 1e-9):.2f}x)")
        table, js = "\n".join(lines), json.dumps(rows)
        return io.NodeOutput(table, js, ui={"text": [table], "json": [js]})
