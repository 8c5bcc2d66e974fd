#!/usr/bin/env bash
# Tests the lmms-eval adapter (adapttoken/eval/lmms_eval_model.py) against lmms-eval 0.7.3 itself,
# in a virtual environment of its own: lmms-eval 0.7.3 pins av<16, which the main environment
# does not have to satisfy. The test (tests/lmms_eval_adapter/test_lmms_eval_adapter.py) builds
# lmms-eval's own `Instance` requests for a tiny synthetic video, resolves `--model adapttoken`
# through lmms-eval's model registry (our entry point) and calls `generate_until` with the bundled
# model. In the main test suite that file is skipped (no lmms_eval there).
#
#   scripts/test_lmms_eval_adapter.sh            # venv on top of this Python's packages, av<16 inside
#   MODE=plain scripts/test_lmms_eval_adapter.sh # a plain venv: installs torch and everything (GBs)
#   VENV=/path/to/venv KEEP=1 ...                # where the venv goes; KEEP=1 reuses it
#
# MODE=shared (default) makes the venv with --system-site-packages and installs av<16 (and the rest
# of lmms-eval's needs that are missing) inside it, where it shadows a newer av of the base Python.
# MODE=plain installs into an empty venv: torch/torchvision (TORCH_SPEC, default "torch
# torchvision"), lmms-eval 0.7.3 with all its dependencies, and this package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${MODE:-shared}
VENV=${VENV:-${TMPDIR:-/tmp}/adapttoken-lmms-eval-venv}
LMMS_EVAL_SPEC=${LMMS_EVAL_SPEC:-lmms-eval==0.7.3}

if [ -z "${KEEP:-}" ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    if [ "$MODE" = plain ]; then
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q ${TORCH_SPEC:-torch torchvision}
    else
        "$PY" -m venv --system-site-packages "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q "$LMMS_EVAL_SPEC" "av<16" pytest pyarrow
    # this package, editable, without re-resolving its needs (the venv has them)
    "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
"$VENV/bin/python" - <<'PY'
import av, lmms_eval, importlib.metadata as md
print(f"lmms-eval {md.version('lmms-eval')}, av {av.__version__} ({av.__file__})")
assert int(av.__version__.split(".")[0]) < 16, "av<16 is not the one imported"
PY
"$VENV/bin/python" -m pytest tests/lmms_eval_adapter -q -p no:cacheprovider -rs "$@"
