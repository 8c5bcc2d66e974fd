"""Which files are "GPU code", and their hash: tests/gpu/results.json records the hash of the code its
GPU run tested, and tests/gpu/test_results_current.py (a CPU test, run in CI) fails once that code
changes without a new GPU run. Rerun on a CUDA machine: `python tests/gpu/run.py` (see its doc)."""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the library's code that runs differently on CUDA (compiled tower, fused kernels, prefix KV on the
# device and its host tier, pinned decoding buffers, NVDEC decoding, feature placement) and the GPU tests themselves
GPU_CODE = ("adapttoken/models/*.py", "adapttoken/features.py", "adapttoken/kv_cache.py",
            "adapttoken/decode.py", "adapttoken/nvdec.py", "adapttoken/frame_reader.py", "tests/gpu/test_gpu_*.py",
            "tests/comfy/inprocess_memory_check.py", "tests/comfy/inprocess_pack.py")


def gpu_files() -> list[Path]:
    files = {p for pattern in GPU_CODE for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(files, key=lambda p: p.relative_to(ROOT).as_posix())


def gpu_code_hash() -> str:
    """sha256 over (path, contents) of every GPU-code file, line endings normalised."""
    h = hashlib.sha256()
    for p in gpu_files():
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0")
        h.update(p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()
