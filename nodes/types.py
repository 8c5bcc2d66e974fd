"""ComfyUI V3 types of the pack's edges, and the V3 schema of a node built from nodes/spec.py."""
from __future__ import annotations

from .comfy_api_compat import io

from . import spec

TYPES = {name: io.Custom(name) for name in spec.CUSTOM_TYPES + spec.FOREIGN_TYPES}
TYPES.update({"INT": io.Int, "FLOAT": io.Float, "STRING": io.String, "BOOLEAN": io.Boolean,
              "COMBO": io.Combo, "IMAGE": io.Image, "VIDEO": io.Video})
UPLOADS = {"video": io.UploadType.video}


def _input(i: spec.In, options: dict[str, list]):
    common = dict(optional=i.optional, tooltip=i.tooltip or None)
    if i.type == "COMBO":
        choices = list(options[i.name]) if i.dynamic else list(i.options)
        return io.Combo.Input(i.name, options=choices, default=i.default,
                              upload=UPLOADS.get(i.upload), **common)
    if i.type in ("INT", "FLOAT"):
        extra = {"control_after_generate": True} if i.control_after_generate else {}
        return TYPES[i.type].Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step,
                                   **extra, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    return TYPES[i.type].Input(i.name, **common)


def schema(node_id: str, **options: list) -> io.Schema:
    """The io.Schema of `node_id`; `options` gives the current choices of its dynamic combos."""
    s = spec.BY_ID[node_id]
    taken = {i.name for i in s.inputs}     # V3 ids are unique across inputs and outputs
    return io.Schema(
        node_id=s.id, display_name=s.display_name, category=spec.CATEGORY, description=s.description,
        inputs=[_input(i, options) for i in s.inputs],
        outputs=[TYPES[o.type].Output(o.name + "_out" if o.name in taken else o.name,
                                      display_name=o.name, tooltip=o.tooltip or None)
                 for o in s.outputs],
        hidden=[io.Hidden.unique_id] if s.hidden_unique_id else None,
        is_output_node=s.output_node)
