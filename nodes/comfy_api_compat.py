"""The ComfyUI V3 API the nodes use, from a versioned module: `comfy_api.v0_0_2` is in ComfyUI
0.3.64 and in today's 0.38.x, so a change to `comfy_api.latest` cannot silently change the nodes.
Where the versioned module is missing, `comfy_api.latest` serves."""
from __future__ import annotations

try:
    from comfy_api.v0_0_2 import ComfyExtension, InputImpl, io, ui  # noqa: F401
except ImportError:                                            # a ComfyUI without v0_0_2
    from comfy_api.latest import ComfyExtension, InputImpl, io, ui  # noqa: F401
