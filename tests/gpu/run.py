"""Run the GPU tests on a CUDA machine and write their results with the hash of the GPU code they
tested (tests/gpu/results.json, committed; a CPU test fails when the code no longer matches):

    COMFYUI_DIR=<ComfyUI> python tests/gpu/run.py [--out tests/gpu/results.json] [-- pytest args]

COMFYUI_DIR: the in-process ComfyUI memory check (test_gpu_memory.py) needs it; without it that test
skips, and a results file with a skip does not satisfy tests/gpu/test_results_current.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_code import ROOT, gpu_code_hash  # noqa: E402

GPU_TESTS = sorted(HERE.glob("test_gpu_*.py"))   # the CUDA tests (test_results_current.py is CPU)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    import torch
    import transformers
    code_hash = gpu_code_hash()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *map(str, GPU_TESTS), "-v", "-rA",
               "-p", "no:cacheprovider", f"--junitxml={xml}", *args.pytest_args]
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        tests = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome = "passed"
                for kind in ("failure", "error", "skipped"):
                    el = case.find(kind)
                    if el is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                        message = (el.get("message") or "")[:500]
                        break
                else:
                    message = ""
                tests.append({"name": case.get("name"), "outcome": outcome,
                              "seconds": round(float(case.get("time") or 0), 2), "message": message})
    count = lambda o: sum(t["outcome"] == o for t in tests)  # noqa: E731
    cuda = torch.cuda.is_available()
    res = {"gpu_code_hash": code_hash,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "pytest_exit": rc,
           "passed": count("passed"), "failed": count("failed"), "errors": count("error"),
           "skipped": count("skipped"), "tests": tests}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "tests"}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
