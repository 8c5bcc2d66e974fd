"""Defaults every part may read (a leaf: imports nothing of the library): the bundled model's folder
and the model the command line, the demo and the benchmarks use when none is named."""
from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODEL = ASSETS / "adapttoken-tiny-synth"


def default_model_dir() -> str:
    return os.environ.get("ADAPTTOKEN_MODEL") or str(BUNDLED_MODEL)

# How a model's weights are stored (models/quant.py): what the CLI, the benchmarks and Load MLLM offer.
# Appending is safe; the order and the names are a promise to saved workflows.
QUANTIZATION_CHOICES = ("none", "nf4", "int8", "fp8")
