"""Errors the library raises for bad input: each message names the input and says what to do."""
from __future__ import annotations


class AdaptTokenError(Exception):
    """Base class: a user-facing error with a one-line message naming the input at fault."""


class VideoError(AdaptTokenError, ValueError):
    """The video input cannot be used (missing, not a video, no frames, truncated, bad range)."""


class ModelLoadError(AdaptTokenError, ValueError):
    """The model folder is missing, of an unsupported family, or holds no safetensors weights."""


class InputError(AdaptTokenError, ValueError):
    """A parameter is out of range (empty question, budget <= 0, group size too large...)."""


class Cancelled(AdaptTokenError):
    """The user cancelled the run (ComfyUI's Cancel, Ctrl-C in the CLI)."""


class OutOfMemory(AdaptTokenError, RuntimeError):
    """The device ran out of memory; the message names what to lower (memory.out_of_memory)."""
