#!/usr/bin/env bash
# The model-zoo tests (tests/test_model_zoo.py): timm's and torchvision's models converted,
# fused and trained beside torch, with a guard that fails if torch's own batch norm runs.
#
# They need torchvision, and this machine's torchvision wheel (0.29.1) needs torch 2.14.1, while
# the main suite pins torch 2.13.0: so they run in their own venv, .venv-zoo (~5.5 GB of local
# wheels), as a second command. Extra arguments go to pytest, e.g. `bash scripts/test_zoo.sh -k counts`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

start=$(date +%s)
if [ ! -x .venv-zoo/bin/python ]; then
    echo "setup: creating .venv-zoo" >&2
    python3 -m venv .venv-zoo >&2
fi
PY=.venv-zoo/bin/python
echo "setup: installing torch==2.14.1, torchvision==0.29.1, timm and the test tools into .venv-zoo" >&2
# Pinned together: an unpinned torch could pull another multi-GB build. triton comes with torch.
"$PY" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" >&2
"$PY" -m pip install -q --disable-pip-version-check timm pytest pytest-xdist hypothesis numpy setuptools >&2
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
echo "setup: $(( $(date +%s) - start )) s" >&2

# Two workers: the interpreter is CPU-bound and the machines have 2 cores.
workers=()
if "$PY" -c 'import xdist' 2>/dev/null; then
    workers=(-n 2)
fi
exec "$PY" -m pytest "${workers[@]}" -q --durations=5 "$@" tests/test_model_zoo.py
