"""The question and the hooks: what every step and every model family may be handed (a leaf:
imports nothing of the library but errors.py)."""
from __future__ import annotations

import string
from dataclasses import dataclass

from .errors import Cancelled, InputError

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _text(name: str, value) -> str:
    """A question or option as str: UTF-8 bytes are decoded; text that is not valid UTF-8 (bytes that
    do not decode, or a str holding lone surrogates, as Python makes of such bytes on a command
    line) is refused naming the first bad byte."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            bad = f"byte 0x{value[e.start]:02x} at position {e.start}"
    elif not isinstance(value, str):
        return str(value)
    else:
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError as e:
            code = ord(value[e.start])
            bad = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}") + \
                f" at position {e.start}"
    raise InputError(f"{name} is not valid UTF-8 text ({bad}): retype it, or save the text as UTF-8")


@dataclass(frozen=True)
class Question:
    """A question about the video; `options` makes it multiple choice with letters A, B, C..."""
    text: str
    options: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "text", _text("question", self.text))
        if not self.text.strip():
            raise InputError("question is empty: type a question about the video")
        if isinstance(self.options, (str, bytes)):
            raise InputError("options: give a list of option texts (one per letter), not one string")
        if len(self.options) == 1:
            raise InputError("options: give at least two options, or none for an open question")
        if len(self.options) > 26:
            raise InputError(f"options: {len(self.options)} given, at most 26 (A-Z) are supported: "
                             f"remove {len(self.options) - 26} of them")
        object.__setattr__(self, "options", tuple(
            _text(f"option {L}", o) for L, o in zip(string.ascii_uppercase, self.options)))
        for L, o in zip(string.ascii_uppercase, self.options):
            if not o.strip():
                raise InputError(f"option {L} is empty: remove it or fill it")

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(string.ascii_uppercase[: len(self.options)])

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    def prompt_text(self) -> str:
        """The user text after the video: lmms-eval's VideoMME layout for multiple choice."""
        if not self.options:
            return self.text.strip()
        opts = "\n".join(f"{L}. {o.strip()}" for L, o in zip(self.letters, self.options))
        return f"{self.text.strip()}\n{opts}\n{MC_INSTRUCTION}"


@dataclass
class Hooks:
    """Progress, cancel and text streaming callbacks for long work (ComfyUI plugs its own in)."""
    progress: object = None             # callable(stage: str, done: int, total: int)
    cancelled: object = None            # callable() -> bool
    on_text: object = None              # callable(text_so_far: str)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("cancelled by the user")


NO_HOOKS = Hooks()
