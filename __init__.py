"""AdaptToken for ComfyUI: registers the nodes (V3) and the web extension. Nothing heavy happens at
import: the node modules load when ComfyUI asks for them, models when a workflow runs.

The nodes import the library as this pack's own subpackage (`<pack>.adapttoken`, relative imports
throughout), so the pack works under any folder name in custom_nodes/, adds nothing to sys.path, and
never picks up another `adapttoken` (a pip-installed one, another copy of the pack)."""
WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from .nodes.extension import AdaptTokenExtension, setup
    setup()
    return AdaptTokenExtension()
