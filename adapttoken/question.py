"""The question and the hooks: what every step and every model family may be handed (a leaf:
imports nothing of the library but errors.py)."""
from __future__ import annotations

import string
from dataclasses import dataclass

from .errors import Cancelled, InputError

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Question:
    """A question about the video; `options` makes it multiple choice with letters A, B, C..."""
    text: str
    options: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise InputError("question is empty: type a question about the video")
        if len(self.options) == 1:
            raise InputError("options: give at least two options, or none for an open question")
        if len(self.options) > 26:
            raise InputError(f"options: {len(self.options)} given, at most 26 (A-Z) are supported")
        for i, o in enumerate(self.options):
            if not str(o).strip():
                raise InputError(f"option {string.ascii_uppercase[i]} is empty: remove it or fill it")

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
