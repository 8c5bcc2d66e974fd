"""MLLM Answer: one pass over the selected tokens, text streamed onto the node as it is generated."""
from __future__ import annotations

import json

from .comfy_api_compat import io

from .. import adapttoken as at
from . import runtime
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
        return io.NodeOutput(res.answer, probs, res.to_json(),
                             ui={"text": [res.answer], "option_probs": [probs], "stats": [json.dumps(stats)]})
