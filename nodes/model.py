"""Load MLLM: a local model folder from models/LLM, managed by ComfyUI's memory manager."""
from __future__ import annotations

from .comfy_api_compat import io

from .. import adapttoken as at
from . import runtime
from .types import schema


class LoadMLLM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_LoadMLLM", model=runtime.model_names(),
                      attention=runtime.attention_options())

    @classmethod
    def validate_inputs(cls, model, attention, quantization="none"):
        if attention not in runtime.attention_options():
            return (f"attention {attention!r} is not available here: use sdpa or eager "
                    f"(flash_attention_2 needs the flash-attn package)")
        problem = runtime.quantization_problem(quantization)
        if problem:
            return problem
        try:
            at.detect_family(runtime.model_dir(model))
        except at.ModelLoadError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, model, **_):
        return runtime.weights_fingerprint(model)

    @classmethod
    def execute(cls, model, dtype, attention, keep_loaded, quantization="none") -> io.NodeOutput:
        with runtime.comfy_errors():
            return io.NodeOutput(runtime.load(model, dtype, attention, keep_loaded, quantization))
