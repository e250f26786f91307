#!/usr/bin/env bash
# One command for the perf report: set up a Python environment if needed, then run
# `python -m perf.report` with every argument passed through (see `--help`).
#
#   perf/run_report.sh                 # CPU: interpreter smoke run into perf/out/
#                                      # GPU: full report into perf/results/<card-slug>/
#   perf/run_report.sh --no-setup ...  # use python3 as it is; install nothing from the network
#
# Which Python:
#   * inside an activated virtual environment: that one;
#   * --no-setup, or a system python3 that already has torch, triton and matplotlib and sees
#     a CUDA device (the lent GPU image: torch and triton preinstalled, no network): python3,
#     with only this checkout installed into it (--no-index: nothing is fetched);
#   * otherwise: .venv at the repository root, created if missing. A missing torch is
#     installed pinned (TORCH_SPEC, default torch==2.13.0): an unpinned torch can resolve
#     to a multi-GB CUDA build on a machine that has no GPU to use it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
setup=auto
args=()
for arg in "$@"; do
    case "$arg" in
        --no-setup) setup=no ;;
        *) args+=("$arg") ;;
    esac
done

has_stack() {  # python has what the report imports
    "$1" -c 'import torch, triton, matplotlib, numpy' >/dev/null 2>&1
}

# The checkout is importable as tritonbn (the kernels install as tritonbn.kernels, so a bare
# PYTHONPATH is not enough), and it is this checkout, not another one installed earlier.
installed_here() {
    "$1" - "$ROOT" >/dev/null 2>&1 <<'EOF'
import os, sys
import tritonbn.kernels
root = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(tritonbn.__file__).startswith(root + os.sep) else 1)
EOF
}

install_checkout() {  # offline: no dependencies, no build isolation, no index
    if ! installed_here "$1"; then
        echo "run_report.sh: installing this checkout into $("$1" -c 'import sys; print(sys.prefix)')"
        "$1" -m pip install --quiet --no-index --no-deps --no-build-isolation -e "$ROOT"
    fi
}

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
    [[ -x "$PY" ]] || PY=python
elif [[ "$setup" == no ]]; then
    PY=python3
elif has_stack python3 && python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >/dev/null 2>&1; then
    PY=python3  # a GPU machine with its own torch: never reinstall torch over it
    setup=no
else
    if [[ ! -x .venv/bin/python ]]; then
        echo "run_report.sh: creating .venv"
        python3 -m venv .venv
    fi
    PY=.venv/bin/python
fi

if [[ "$setup" != no ]] && ! has_stack "$PY"; then
    echo "run_report.sh: installing $TORCH_SPEC, triton, matplotlib, numpy into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install "$TORCH_SPEC" triton matplotlib numpy "setuptools>=64"
fi
if ! "$PY" -c 'import setuptools' >/dev/null 2>&1; then
    # --no-build-isolation builds with the environment's own setuptools (newer venvs lack it).
    [[ "$setup" != no ]] && "$PY" -m pip install "setuptools>=64"
fi
install_checkout "$PY"

exec "$PY" -m perf.report ${args[@]+"${args[@]}"}
