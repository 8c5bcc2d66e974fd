"""Selection Preview: what was kept, where and when, as an IMAGE shown on the node."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..adapttoken.preview import preview_tensor
from . import runtime
from .types import schema


class SelectionPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_SelectionPreview")

    @classmethod
    def execute(cls, selection) -> io.NodeOutput:
        with runtime.comfy_errors():
            image = preview_tensor(selection)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
