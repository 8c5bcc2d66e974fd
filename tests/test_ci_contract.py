"""CI runs the README's two commands as written, so the README cannot drift from what CI checks."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_has_two_commands_and_ci_runs_them_verbatim():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("adapttoken demo") and "pytest" in commands[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for cmd in commands:
        assert any(line == cmd or line.startswith(cmd + " ") for line in ci_lines), f"{cmd!r} not in .ci/run"


def test_ci_requires_the_comfyui_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ADAPTTOKEN_REQUIRE_COMFY=1" in ci and "COMFYUI_DIR" in ci and "shared/ComfyUI" in ci
    assert "npm ci" in ci and "chromium" in ci


def test_test_extra_brings_pytest():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("pytest") for dep in project["optional-dependencies"]["test"])
    assert project["scripts"]["adapttoken"] == "adapttoken.cli:main"
