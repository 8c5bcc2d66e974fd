"""Shared by the in-process checks (inprocess_check.py, inprocess_memory_check.py): ComfyUI's memory
manager from $COMFYUI_DIR (on the CPU unless CUDA is there) and this pack's nodes, imported as
ComfyUI imports a custom node folder (no server)."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_pack(model_dir: Path, with_core_nodes: bool = False):
    """-> (comfy.model_management, {node_id: node class}); `model_dir`'s parent becomes an LLM
    model folder. with_core_nodes: import ComfyUI's own top-level `nodes` too, as a real start-up
    does (skipped, with a note, where its requirements are missing)."""
    sys.path.insert(0, str(Path(os.environ["COMFYUI_DIR"]).resolve()))
    import torch
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    import comfy.model_management as mm
    import folder_paths
    if with_core_nodes:
        try:
            import nodes  # noqa: F401
        except ImportError as e:  # a machine with only what the pack needs (no torchsde...)
            print(f"ComfyUI's nodes module not importable ({e}); going on without it", file=sys.stderr)
    folder_paths.add_model_folder_path("LLM", str(Path(model_dir).parent))
    spec = importlib.util.spec_from_file_location("adapttoken_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["adapttoken_pack"] = pack
    spec.loader.exec_module(pack)
    ext = asyncio.run(pack.comfy_entrypoint())
    return mm, {c.GET_SCHEMA().node_id: c for c in asyncio.run(ext.get_node_list())}
