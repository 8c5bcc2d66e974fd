"""Selection Preview: what was kept, where and when, as an IMAGE shown on the node."""
from __future__ import annotations

from .comfy_api_compat import io, ui

import json

from ..adapttoken.evidence import key_moments, moment_frames
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


class KeyMoments(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_KeyMoments")

    @classmethod
    def execute(cls, selection, count) -> io.NodeOutput:
        with runtime.comfy_errors():
            moments = key_moments(selection, count)
            frames = moment_frames(selection, moments)
        images = frames.float().div_(255.0)
        text = json.dumps(moments)
        return io.NodeOutput(images, text, moments,
                             ui={"moments": [text], **ui.PreviewImage(images, cls=cls).as_dict()}
                             if len(moments) else {"moments": [text]})
