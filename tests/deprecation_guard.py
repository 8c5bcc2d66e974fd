"""pytest plugin: a FutureWarning or DeprecationWarning raised by *our* calls fails the test.

"Our call" means the call stack at the moment the warning is issued passes through a file under
the checkout's `adapttoken/` or `nodes/`. The stack is walked frame by frame, not judged from the
filename the warning is attributed to: transformers warns with `stacklevel=2`, which names its own
decorator's file, although the deprecated keyword came from us. Warnings whose stack does not pass
through our code (torch or transformers internals, the tests' own calls) only show, as usual.

How: around each phase of each test (setup, call, teardown; so session fixtures built in a test's
setup count too) and around the collection of each module, the plugin enters
`warnings.catch_warnings()`, sets the action "always" for the two categories (so nothing of ours
is hidden by "ignore" or "once", or turned into an exception inside the code under test by an
"error" filter) and installs its own `warnings.showwarning`, which Python calls synchronously in
the warning thread. The hook records our warnings and hands every warning on to the previous
handler, so pytest's warnings summary still lists them. At the end of the phase, recorded
warnings fail the test with the place in our code they came through.

Registered by tests/conftest.py; tests/test_deprecation_guard.py proves it works.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

CATEGORIES = (FutureWarning, DeprecationWarning)
ROOT = Path(__file__).resolve().parents[1]
OUR_DIRS = tuple(os.path.realpath(ROOT / d) + os.sep for d in ("adapttoken", "nodes"))


@functools.lru_cache(maxsize=4096)
def is_ours(filename: str) -> bool:
    if not filename or filename.startswith("<"):
        return False
    return os.path.realpath(filename).startswith(OUR_DIRS)


def our_frame(frame):
    """The innermost frame, from `frame` outwards, whose code lives in our directories; None when
    the warning comes from another package's module-level code run by an import (an import
    machinery frame comes first: torch.compile, say, imports modules of torch that decorate with
    its own deprecated `torch.jit.script_method`: their deprecation, not a call of ours)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if is_ours(name):
            return frame
        if name.startswith("<frozen importlib"):
            return None
        frame = frame.f_back
    return None


@contextmanager
def guard():
    """Yields the list that collects (text) for each of our FutureWarning/DeprecationWarning."""
    found: list[str] = []
    with warnings.catch_warnings():
        for cat in CATEGORIES:
            warnings.simplefilter("always", cat)
        prev = warnings.showwarning

        def hook(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, CATEGORIES):
                f = our_frame(sys._getframe(1))
                if f is not None:
                    rel = os.path.relpath(f.f_code.co_filename, ROOT)
                    found.append(f"{category.__name__}: {message}\n"
                                 f"    through {rel}:{f.f_lineno} in {f.f_code.co_name}"
                                 f" (attributed to {filename}:{lineno})")
            _forward(prev, message, category, filename, lineno, file, line)

        warnings.showwarning = hook
        yield found


def _forward(prev, message, category, filename, lineno, file, line):
    # Inside pytest's catch_warnings(record=True), showwarning is the original printer and the
    # recording sits behind it (the module's _showwarnmsg_impl); hand the warning to the recorder
    # then, so it reaches pytest's warnings summary instead of stderr.
    impl = getattr(warnings, "_showwarnmsg_impl", None)
    if prev is getattr(warnings, "_showwarning_orig", None) and impl is not None:
        impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
    else:
        prev(message, category, filename, lineno, file, line)


def _report(found: list[str], when: str) -> str:
    counts: dict[str, int] = {}
    for text in found:
        counts[text] = counts.get(text, 0) + 1
    return (f"{len(found)} FutureWarning/DeprecationWarning raised through adapttoken/ or nodes/ "
            f"during {when}:\n" + "\n".join(t + (f"\n    ({n} times)" if n > 1 else "")
                                            for t, n in counts.items()))


def _phase(when):
    @pytest.hookimpl(wrapper=True)
    def wrapper(item):
        with guard() as found:
            res = yield
        if found:
            pytest.fail(_report(found, when), pytrace=False)
        return res
    wrapper.__name__ = f"pytest_runtest_{when}"
    return wrapper


pytest_runtest_setup = _phase("setup")
pytest_runtest_call = _phase("call")
pytest_runtest_teardown = _phase("teardown")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    with guard() as found:
        rep = yield
    if found and rep.outcome != "failed":
        rep.outcome = "failed"
        rep.longrepr = _report(found, f"the collection of {collector.nodeid or 'the session'}")
    return rep
