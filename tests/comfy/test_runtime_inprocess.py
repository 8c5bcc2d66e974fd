"""nodes/runtime.py inside ComfyUI's memory manager, in-process (see inprocess_check.py): the model
loads onto ComfyUI's device, and unloading it (/free, "Unload models", keep_loaded off) takes the
cached video features with it. On a CUDA machine it also checks weights and buffers on the GPU and
back. Skipped without COMFYUI_DIR."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parents[1] / "adapttoken" / "assets" / "adapttoken-tiny-synth"


def test_model_lifetime_in_process(comfyui_dir, tmp_path):
    model = BUNDLED
    if not (model / "config.json").is_file():
        from adapttoken.training.tiny import build_tiny_model, save_model_folder
        m, p = build_tiny_model(seed=0, layers=4, vision_depth=2)
        model = save_model_folder(tmp_path / "LLM" / "tiny-qwen25vl", m, p)
    r = subprocess.run([sys.executable, str(HERE / "inprocess_check.py"), "--model", str(model)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, COMFYUI_DIR=str(comfyui_dir), HF_HUB_OFFLINE="1"))
    assert r.stdout.strip(), r.stderr[-3000:]
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and facts["failures"] == [], (facts, r.stderr[-3000:])
    assert facts["features_after_unload"] == 0 and facts["features_after_keep_loaded_off"] == 0
    assert facts["weights_during_run"].split(":")[0] == facts["device"].split(":")[0]


def test_caches_in_comfy_memory_manager(comfyui_dir):
    """inprocess_memory_check.py: ComfyUI's loaded-model figure counts the caches, its requests for
    memory (model_unload with memory_to_free, free_memory, unload_all_models) drop them and the
    figure falls back to the weights, and an out-of-memory error in a node is one line, caches gone."""
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.skip("bundled model weights missing")
    r = subprocess.run([sys.executable, str(HERE / "inprocess_memory_check.py")],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, COMFYUI_DIR=str(comfyui_dir), HF_HUB_OFFLINE="1"))
    assert r.stdout.strip(), r.stderr[-3000:]
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and facts["failures"] == [], (facts, r.stderr[-3000:])
    assert facts["comfy_model_memory"] > facts["weights_bytes"]
    assert facts["held_after_unload_all"] == {} and facts["held_after_oom"] == {}


@pytest.mark.parametrize("quantization", ["nf4", "int8", "fp8"])
def test_quantized_model_stays_put_in_comfy(comfyui_dir, quantization):
    """inprocess_quant_check.py: Load MLLM with quantized weights (bitsandbytes nf4/int8, or fp8)
    loads them onto ComfyUI's compute device and never moves them (offload device = load device);
    unloading drops the video caches only, and the model answers again. nf4/int8 need bitsandbytes
    (on the CPU: a release that runs 4-bit/8-bit there); fp8 needs only torch (FP8 matmuls on the
    CPU, or a GPU of compute capability 8.9+)."""
    import importlib.util
    if quantization != "fp8" and (importlib.util.find_spec("bitsandbytes") is None
                                  or importlib.util.find_spec("accelerate") is None):
        pytest.skip('bitsandbytes/accelerate not installed (pip install -e ".[quant]")')
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.skip("bundled model weights missing")
    r = subprocess.run([sys.executable, str(HERE / "inprocess_quant_check.py"),
                        "--quantization", quantization],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, COMFYUI_DIR=str(comfyui_dir), HF_HUB_OFFLINE="1"))
    assert r.stdout.strip(), r.stderr[-3000:]
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and facts["failures"] == [], (facts, r.stderr[-3000:])
    assert facts["answer"] and facts["answer_after_unload"]
