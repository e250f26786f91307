#!/usr/bin/env bash
# Run tritonbn's test suite: set up the environment, lint, then pytest.
#
# Without a GPU the kernels run in Triton's interpreter on the CPU (tests/conftest.py sets
# TRITON_INTERPRET=1); with one, the same suite runs natively on CUDA.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k numerics`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="$(bash scripts/setup_env.sh)"

if "$PY" -m ruff --version >/dev/null 2>&1; then
    "$PY" -m ruff check kernels tritonbn tests perf
fi
# Two workers: the interpreter is CPU-bound and the machines have 2 cores.
workers=()
if "$PY" -c 'import xdist' 2>/dev/null; then
    workers=(-n 2)
fi
exec "$PY" -m pytest "${workers[@]}" -q "$@" tests
