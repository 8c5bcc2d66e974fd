"""CPU test (runs in CI): the committed GPU test results were produced by the GPU code as it is now,
and they passed. A change to GPU code cannot land without a new GPU run (`python tests/gpu/run.py`
on a CUDA machine, then commit tests/gpu/results.json)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("adapttoken_gpu_code", HERE / "gpu_code.py")
gpu_code = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_code)


def test_gpu_results_match_the_gpu_code_and_passed():
    path = HERE / "results.json"
    assert path.is_file(), "no tests/gpu/results.json: run `python tests/gpu/run.py` on a CUDA machine"
    res = json.loads(path.read_text())
    now = gpu_code.gpu_code_hash()
    assert res["gpu_code_hash"] == now, (
        f"GPU code changed since the last GPU test run ({res['gpu_code_hash'][:12]} in results.json, "
        f"{now[:12]} now): run `python tests/gpu/run.py` on a CUDA machine and commit tests/gpu/results.json")
    assert res["cuda"] and res["failed"] == 0 and res["errors"] == 0, res
    assert res["passed"] >= 5 and res["skipped"] == 0, res
    names = {t["name"] for t in res["tests"] if t["outcome"] == "passed"}
    for required in ("compiled_vision_tower", "fused_text_kernels", "prefix_kv_on_the_gpu",
                     "host_tier", "warm_and_cold", "bundled_model_2048_frames",
                     "7b_random_architecture_1024_frames", "comfy_frees_the_caches_on_the_gpu"):
        assert any(required in n for n in names), f"no passed GPU test for {required}: {sorted(names)}"


def test_the_hash_covers_the_gpu_code():
    files = {p.relative_to(gpu_code.ROOT).as_posix() for p in gpu_code.gpu_files()}
    for f in ("adapttoken/kv_cache.py", "adapttoken/models/fused_text.py",
              "adapttoken/models/qwen_vision_fast.py", "adapttoken/models/qwen2_5_vl.py",
              "tests/gpu/test_gpu_paths.py", "tests/gpu/test_gpu_determinism.py",
              "tests/gpu/test_gpu_memory.py"):
        assert f in files
