"""Defaults every part may read (a leaf: imports nothing of the library): the bundled model's folder
and the model the command line, the demo and the benchmarks use when none is named."""
from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODEL = ASSETS / "adapttoken-tiny-synth"


def default_model_dir() -> str:
    return os.environ.get("ADAPTTOKEN_MODEL") or str(BUNDLED_MODEL)
