"""The deprecation guard (tests/deprecation_guard.py) works: a FutureWarning/DeprecationWarning
whose stack passes through adapttoken/ or nodes/ fails the test, other warnings do not.

A generated test file runs in a separate pytest process with only the guard registered. Its "our"
functions are compiled with filenames under this checkout's adapttoken/ and nodes/ (no file is
written there), its "library" with a filename outside, so the guard's real directory check is
what decides."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARD = Path(__file__).with_name("deprecation_guard.py")

CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("guard_under_test", {str(GUARD)!r})
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)

def pytest_configure(config):
    config.pluginmanager.register(guard, "guard-under-test")
"""

PROBE = """
import threading
import warnings

import pytest

ROOT = {root!r}
LIB_FILE = {lib!r}


def load(src, filename, **names):
    ns = dict(warnings=warnings, threading=threading, **names)
    exec(compile(src, filename, "exec"), ns)
    return ns


# a library that deprecates a keyword the way transformers does: the warning is attributed
# (stacklevel=2) to the library's own wrapper, not to whoever passed the keyword
LIB = load('''
def _notify(msg):
    warnings.warn(msg, FutureWarning, stacklevel=2)

def forward(**kw):
    if "old" in kw:
        _notify("`old` is deprecated, use `new` instead")
''', LIB_FILE)

OURS = load('''
def old_api():
    LIB_forward(old=1)

def new_api():
    LIB_forward(new=1)

def deprecated_here():
    warnings.warn("an adapttoken deprecation", DeprecationWarning)

def user_warning():
    warnings.warn("not a deprecation", UserWarning)

def swallowed():
    try:
        LIB_forward(old=1)
    except Exception:
        pass

def in_thread():
    t = threading.Thread(target=old_api)
    t.start()
    t.join()
''', ROOT + "/adapttoken/_guard_probe.py", LIB_forward=LIB["forward"])

NODES = load('''
def node_run():
    LIB_forward(old=1)
''', ROOT + "/nodes/_guard_probe.py", LIB_forward=LIB["forward"])


@pytest.fixture(scope="session")
def built_with_old_api():
    OURS["old_api"]()
    return 1


def test_ours_through_library_fails():
    OURS["old_api"]()

def test_ours_direct_fails():
    OURS["deprecated_here"]()

def test_nodes_fails():
    NODES["node_run"]()

def test_ours_even_if_caught_by_our_code_fails():
    OURS["swallowed"]()

def test_ours_in_a_thread_fails():
    OURS["in_thread"]()

def test_session_fixture_fails(built_with_old_api):
    pass

def test_ours_under_an_error_filter_fails():
    with pytest.raises(FutureWarning):           # an error filter still raises where it did ...
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            OURS["old_api"]()
    OURS["old_api"]()                            # ... and the shown ones are ours

def test_library_alone_passes():
    LIB["forward"](old=1)

def test_new_api_passes():
    OURS["new_api"]()

def test_user_warning_through_ours_passes():
    OURS["user_warning"]()

def test_attributed_to_ours_but_not_through_ours_passes():
    warnings.warn_explicit("only the name says adapttoken", FutureWarning,
                           ROOT + "/adapttoken/pipeline.py", 1)
"""

EXPECTED = {
    "test_ours_through_library_fails": "FAILED",
    "test_ours_direct_fails": "FAILED",
    "test_nodes_fails": "FAILED",
    "test_ours_even_if_caught_by_our_code_fails": "FAILED",
    "test_ours_in_a_thread_fails": "FAILED",
    "test_session_fixture_fails": "ERROR",
    "test_ours_under_an_error_filter_fails": "FAILED",
    "test_library_alone_passes": "PASSED",
    "test_new_api_passes": "PASSED",
    "test_user_warning_through_ours_passes": "PASSED",
    "test_attributed_to_ours_but_not_through_ours_passes": "PASSED",
}


# a test module whose import goes through our code: its collection fails
IMPORT_PROBE = """
from test_probe import OURS

OURS["old_api"]()

def test_never_runs():
    pass
"""


def test_guard_fails_our_deprecations_only(tmp_path):
    lib = str(tmp_path / "thirdparty" / "deprecation.py")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_probe.py").write_text(
        textwrap.dedent(PROBE).format(root=str(ROOT), lib=lib))
    (tmp_path / "test_probe_import.py").write_text(IMPORT_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONWARNINGS")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider",
                          "--continue-on-collection-errors",
                          "test_probe.py", "test_probe_import.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    got = dict((name, outcome) for outcome, name in
               re.findall(r"^(PASSED|FAILED|ERROR) test_probe\.py::(\w+)", out, re.M))
    assert got == EXPECTED, out
    assert re.search(r"^ERROR test_probe_import\.py\b", out, re.M), out
    assert "test_never_runs" not in out, out
    assert "during the collection of test_probe_import.py" in out, out
    # the report names the place in our code, and the attribution that hid it
    assert re.search(r"through adapttoken/_guard_probe\.py:\d+ in old_api "
                     r"\(attributed to .*thirdparty/deprecation\.py:\d+\)", out), out
    assert "through nodes/_guard_probe.py" in out, out
    # warnings that are not ours still reach pytest's warnings summary
    assert "warnings summary" in out and "test_library_alone_passes" in out, out


def test_guard_is_registered_in_this_suite(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("adapttoken-deprecation-guard")


def test_another_packages_import_time_warning_is_not_ours(tmp_path, monkeypatch):
    """Our code imports a library whose module-level code warns (as torch's inductor modules do when
    torch.compile first imports them): not our call. Our code calling a deprecated function of the
    same library still is."""
    import importlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("guard_for_unit", GUARD)
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    (tmp_path / "oldlib_at_import.py").write_text(
        "import warnings\n"
        "warnings.warn('old decorator', DeprecationWarning)\n"
        "def old():\n    warnings.warn('old()', DeprecationWarning, stacklevel=2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ns = {"importlib": importlib}
    exec(compile("def use():\n    m = importlib.import_module('oldlib_at_import')\n    return m\n"
                 "def call(m):\n    m.old()\n", str(ROOT / "adapttoken" / "_probe_only.py"), "exec"), ns)
    import warnings
    with warnings.catch_warnings():
        warnings.showwarning = lambda *a, **k: None    # this suite's own guard must not see them
        with guard.guard() as found:
            m = ns["use"]()
        assert found == []
        with guard.guard() as found:
            ns["call"](m)
    assert len(found) == 1 and "old()" in found[0]
    sys.modules.pop("oldlib_at_import", None)
