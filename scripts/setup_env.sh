#!/usr/bin/env bash
# Prepare a Python environment for tritonbn and print the interpreter to use.
#
# * A machine whose python3 already has torch with CUDA and triton (the lent GPU image:
#   no network there) installs nothing from the network: only this checkout, editable.
# * Anywhere else (CPU-only developer machines, CI) a venv .venv at the repo root gets
#   torch pinned to 2.13.0, the CPU build: an unpinned torch would pull a multi-GB CUDA
#   build. triton and the test/perf tools come from PyPI.
#
# Usage: PY=$(bash scripts/setup_env.sh)   (progress goes to stderr)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if python3 -c 'import sys, torch, triton; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "setup: using the system python3 (torch with CUDA found); installing this checkout only" >&2
    python3 -m pip install -q --no-deps --no-build-isolation -e . >&2
    command -v python3
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv >&2
fi
echo "setup: installing torch==2.13.0 (CPU), triton and tools into .venv" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" triton pytest pytest-xdist hypothesis numpy matplotlib ruff setuptools >&2
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
echo "$root/.venv/bin/python"
