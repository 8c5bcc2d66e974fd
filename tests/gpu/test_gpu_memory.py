"""On a CUDA machine, inside ComfyUI's memory manager (in-process, no server): the pack's caches are
counted in what ComfyUI sees, and ComfyUI making room (a partial unload, free_memory, another model
loaded with load_models_gpu and a large memory_required, unload_all_models) frees them:
torch.cuda.memory_allocated drops by at least their bytes. See tests/comfy/inprocess_memory_check.py.

    COMFYUI_DIR=<ComfyUI> python -m pytest tests/gpu -q -p no:cacheprovider

Skipped without CUDA, without COMFYUI_DIR, or when ComfyUI's modules cannot be imported (its
requirements missing), with the reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).resolve().parents[1] / "comfy" / "inprocess_memory_check.py"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("frames", [512, 2048])
def test_comfy_frees_the_caches_on_the_gpu(frames):
    comfy = os.environ.get("COMFYUI_DIR")
    if not comfy:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout")
    r = subprocess.run([sys.executable, str(CHECK), "--frames", str(frames)], capture_output=True,
                       text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = r.stdout.strip().splitlines()
    assert lines, r.stderr[-3000:]
    facts = json.loads(lines[-1])
    if r.returncode == 2:
        pytest.skip(facts.get("skipped", "ComfyUI not importable"))
    print(json.dumps(facts, indent=1))
    assert r.returncode == 0 and facts["failures"] == [], (facts, r.stderr[-3000:])
    assert facts["device"].startswith("cuda")
    assert facts["cuda_freed_by_free_memory"] > 0 and facts["cuda_freed_by_second_model"] >= 0
