"""Model families behind one small protocol (base.Adapter), loaded by loading.py."""
from ..question import Hooks, Question
from .base import Adapter, ForwardOut, Generation, Prompt
from .loading import (Model, detect_family, download_model, load_adapter, load_model,
                      supported_families)

__all__ = ["Adapter", "ForwardOut", "Generation", "Hooks", "Model", "Prompt", "Question",
           "detect_family", "download_model", "load_adapter", "load_model", "supported_families"]
