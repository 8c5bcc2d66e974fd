"""The library imports itself relatively, so it works as the pack's subpackage under any pack
folder name (ComfyUI imports `custom_nodes/<anyname>` under its path) and never pulls in another
top-level `adapttoken`; the nodes import it the same way."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python -m adapttoken.bench.*` (entry points); they import the installed package by name.
ENTRY_POINTS = {"adapttoken/bench"}


def absolute_self_imports(folder: str) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(e + "/") for e in ENTRY_POINTS):
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                if n == "adapttoken" or n.startswith("adapttoken."):
                    found.append(f"{rel}:{node.lineno}: {n}")
    return found


def test_library_and_nodes_have_no_absolute_self_imports():
    assert absolute_self_imports("adapttoken") == []
    assert absolute_self_imports("nodes") == []


def test_library_loads_as_a_subpackage_of_a_pack_with_any_name():
    """The pack under an odd folder name, the repository not on sys.path: every library module
    imports, no top-level `adapttoken` appears, and the errors a module raises are the ones the
    pack's `adapttoken` exports (what nodes/runtime.comfy_errors catches)."""
    code = (
        "import importlib, importlib.util, pkgutil, sys\n"
        f"root = {str(ROOT)!r}\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', root)]\n"
        "spec = importlib.util.spec_from_file_location('my_renamed_pack', root + '/__init__.py',"
        " submodule_search_locations=[root])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['my_renamed_pack'] = m\n"
        "spec.loader.exec_module(m)\n"
        "at = importlib.import_module('my_renamed_pack.adapttoken')\n"
        "skip = ('my_renamed_pack.adapttoken.bench',)\n"
        "for info in pkgutil.walk_packages(at.__path__, 'my_renamed_pack.adapttoken.'):\n"
        "    if not info.name.startswith(skip) and not info.name.endswith('__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "video = sys.modules['my_renamed_pack.adapttoken.video']\n"
        "assert video.InputError is at.InputError and video.VideoError is at.VideoError\n"
        "try:\n"
        "    video.probe_video('/no/such/clip.mp4')\n"
        "except at.AdaptTokenError as e:\n"
        "    print(type(e).__module__)\n"
        "print(sorted(k for k in sys.modules if k == 'adapttoken' or k.startswith('adapttoken.')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["my_renamed_pack.adapttoken.errors", "[]"]
