"""AdaptToken for ComfyUI: registers the nodes (V3) and the web extension. Nothing heavy happens at
import: the node modules load when ComfyUI asks for them, models when a workflow runs."""
import os
import sys

WEB_DIRECTORY = "./web/js"
_PACK = os.path.dirname(os.path.abspath(__file__))


def _use_bundled_library() -> None:
    """The nodes import `adapttoken`, the library in this folder (unless it was imported already)."""
    if "adapttoken" not in sys.modules and _PACK not in sys.path:
        sys.path.insert(0, _PACK)


async def comfy_entrypoint():
    _use_bundled_library()
    from .nodes.extension import AdaptTokenExtension, setup
    setup()
    return AdaptTokenExtension()
