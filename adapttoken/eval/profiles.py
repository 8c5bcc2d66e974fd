"""Prompt texts, new-token counts and answer parsers of the two conventions.

* `flexselect2025`: what the paper's baselines ran (FlexSelect's 2025 copy of lmms-eval): one new
  token for VideoMME / LongVideoBench / LVBench, a "Best option: (" suffix for MLVU, "first letter"
  parsing.
* `lmms_eval`: today's lmms-eval: 16 (32 for LongVideoBench) new tokens and a priority parser.
* `plain`: our own layout for every benchmark (`Question.prompt_text`: question, "A. ..." lines,
  "Answer with the option's letter from the given choices directly."), 4 new tokens, the priority
  parser. Not a published convention: what `adapttoken ask` sends, and what the bundled tiny model
  was trained on, so the tests can check known answers through every reader.

Texts and rules are quoted with their sources in docs/EVAL.md. A parse failure returns "" and is
scored wrong; nothing here guesses (LongVideoBench's own scorer picks a random letter instead).
The user text goes after the video in one user turn (the model's chat template adds the system
prompt), and the same text is used in the group passes and in the answer.
"""
from __future__ import annotations

import re

from ..errors import InputError
from ..question import Question

VIDEOMME_HEAD = ("Select the best answer to the following multiple-choice question based on the video "
                 "and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
LVBENCH_HEAD_FLEX = ("Select the best answer to the following multiple-choice question based on the "
                     "video. Respond with only the letter (A, B, C, or D) of the correct option.")
DIRECT = "Answer with the option's letter from the given choices directly."
SUBTITLE_HEAD = "This video's subtitles are listed below:"

# max_new_tokens per (profile, bench)
NEW_TOKENS = {
    "flexselect2025": {"videomme": 1, "mlvu": 16, "longvideobench": 1, "lvbench": 1, "jsonl": 1},
    "lmms_eval": {"videomme": 16, "mlvu": 16, "longvideobench": 32, "lvbench": 16, "jsonl": 16},
    "plain": {"videomme": 4, "mlvu": 4, "longvideobench": 4, "lvbench": 4, "jsonl": 4},
}
PROFILES = tuple(NEW_TOKENS)


class EvalQuestion(Question):
    """A Question whose user text is the benchmark's own prompt (options keep their letters for
    the entropy over option letters)."""

    def __init__(self, text: str, options, prompt: str):
        super().__init__(text, tuple(options))
        object.__setattr__(self, "_prompt", prompt)

    def prompt_text(self) -> str:
        return self._prompt


def _check(profile: str) -> None:
    if profile not in NEW_TOKENS:
        raise InputError(f"profile {profile!r} is not known: use one of {', '.join(PROFILES)}")


def prompt_text(profile: str, item, subtitles: list[str] | None = None) -> str:
    """The user text after the video for `item` under `profile`."""
    _check(profile)
    b, L = item.bench, item.letters
    if profile == "plain":
        text = Question(item.question, tuple(item.options)).prompt_text()
    elif b == "videomme":
        opts = item.options_raw or [f"{l}. {o}" for l, o in zip(L, item.options)]
        text = f"{VIDEOMME_HEAD}\n{item.question}\n" + "\n".join(opts) + "\n" + "\n" + DIRECT
    elif b == "mlvu":
        q = item.question_raw or item.question
        if profile == "flexselect2025":
            text = "\n" + q + "\nAnswer with the best option's letter from the given choices directly.\nBest option: ("
        else:
            text = q + "\nOnly give the best option.\nBest option: ("
    elif b == "longvideobench":
        text = item.question + "\n" + "".join(f"{l}. {o}\n" for l, o in zip(L, item.options)) + DIRECT + "\n"
    elif b == "lvbench":
        q = item.question_raw or (item.question + "\n" + "\n".join(f"({l}) {o}" for l, o in zip(L, item.options)))
        if profile == "flexselect2025":
            for l in L:
                q = q.replace(f"({l})", l)
            text = LVBENCH_HEAD_FLEX + "\n" + q + "\n" + "\n" + DIRECT
        else:
            text = q + "\nAnswer the question with the option letter"
    else:                                                   # a user's own data set [ours]
        text = item.question.strip() + "\n" + "\n".join(f"{l}. {o}" for l, o in zip(L, item.options)) + "\n" + DIRECT
    if subtitles:
        text = SUBTITLE_HEAD + "\n" + "\n".join(subtitles) + "\n" + text
    return text


def question_for(profile: str, item, subtitles=None) -> EvalQuestion:
    return EvalQuestion(item.question, item.options, prompt_text(profile, item, subtitles))


def max_new_tokens(profile: str, bench: str) -> int:
    _check(profile)
    return NEW_TOKENS[profile][bench]


# --- parsers -----------------------------------------------------------------------------------

PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
            "The best option is", "The correct option is", "Best answer:", "Best option:")


def first_letter(s: str, letters: str = "ABCD") -> str:
    """Pre-2026 lmms-eval / FlexSelect for VideoMME and LVBench (LongVideoBench with ABCDE): strip
    the answer prefixes; "" if more than 10 words and no letter; else the first letter anywhere."""
    s = s.strip()
    for p in PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search(f"[{letters}]", s):
        return ""
    m = re.search(f"[{letters}]", s)
    return m[0] if m else ""


def before_paren(s: str) -> str:
    """FlexSelect's MLVU rule: the character before the first ')', else the whole answer."""
    s = s.strip()
    i = s.find(")")
    return s[i - 1] if i > 0 else s


# Today's lmms-eval (VideoMME, MLVU, LVBench): candidates in several formats, ordered by priority;
# the best priority wins, then the last position. Our reading of the rules listed in EVAL.md.
_PHRASE = r"(?:the\s+(?:correct\s+|best\s+|final\s+)?(?:answer|option|choice)\s+is|answer\s*:|option\s*:|best option\s*:)"


def priority_letter(s: str, letters) -> str:
    t = (s or "").strip().strip("*`'\" ")
    if not t:
        return ""
    L = "".join(letters)
    nl = r"(?![A-Za-z])"
    pats = [
        rf"^[\s(\[]*([{L}]){nl}",                   # start of text
        rf"(?<![A-Za-z])([{L}])[\s.)\]!:]*$",       # end of text
        rf"(?i:{_PHRASE})\s*[(\[]?\s*([{L}]){nl}",  # answer phrase
        rf"\(([{L}])\)",                            # (A)
        rf"(?<![A-Za-z])([{L}])\.",                  # A.
        rf"(?<![A-Za-z])([{L}]):",                   # A:
        rf"(?<![A-Za-z(])([{L}])\)",                 # A)
        rf"(?<![A-Za-z])([{L}]) ",                   # "A "
        rf"(?<![A-Za-z])([{L}]){nl}",               # any occurrence
    ]
    for pat in pats:
        hits = list(re.finditer(pat, t))
        if hits:
            return hits[-1].group(1)
    return ""


def parse(profile: str, bench: str, text: str, letters) -> str:
    """The letter `text` answers under `profile`'s rule for `bench`, or "" (a parse failure)."""
    _check(profile)
    letters = list(letters)
    if profile == "plain":
        got = priority_letter(text, letters)
    elif bench == "longvideobench":
        got = first_letter(text, "ABCDE")           # both conventions (no random fallback here)
    elif profile == "flexselect2025":
        got = before_paren(text) if bench == "mlvu" else first_letter(text, "ABCD" if len(letters) <= 4 else "".join(letters))
    else:
        got = priority_letter(text, letters)
    return got if len(got) == 1 and got.isupper() else ""
