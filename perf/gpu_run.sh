#!/usr/bin/env bash
# The one script to run on a lent GPU machine (torch and triton preinstalled, no network,
# 10 minutes per command). It installs this checkout offline, runs the test suite on CUDA,
# the static compile checks (perf/static_checks.py, when present) and the full perf report,
# and leaves everything worth keeping in $OUT (default perf/out):
#
#   gpu_run.log      all output of this script
#   results.csv      the report's rows          summary.txt   the report's summary table
#   plots.tar.gz     the report's PNGs (packed: at most 8 files come back from $OUT)
#   static_checks.md perf/static_checks.py's report
#   model_step.csv   perf/model_step.py's rows (stage `model`, or the report's last section)
#
# Usage:
#   perf/gpu_run.sh                            # tests, static, report: all within the budget
#   perf/gpu_run.sh tests static               # only these stages
#   perf/gpu_run.sh report --resume --dtypes bfloat16   # other words go to perf/report.py
#   perf/gpu_run.sh model                      # only the model-level benchmark (perf/model_step.py)
#
# A failing stage does not stop the next one: each exit code is recorded and printed at the
# end, and the script exits non-zero if any stage failed. The whole run keeps inside
# GPU_RUN_BUDGET_S seconds (default 570, under the tool's 600): the report gets what the
# earlier stages left, starts no new case past its share, and is stopped hard before the
# end so that its (incrementally written) CSV and plots are still copied out.
#
# Knobs (environment): PYTHON (default python3), GPU_RUN_BUDGET_S, GPU_RUN_TEST_TIMEOUT_S
# (240), GPU_RUN_STATIC_TIMEOUT_S (150), GPU_RUN_STATIC_ARGS (default: --workers N --out
# $OUT/static_checks.md), GPU_RUN_MODEL_ARGS (extra words for perf/model_step.py, e.g.
# "--resume --variants torch-compile convert-compile").
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/perf/out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
export PYTHONUNBUFFERED=1

PY="${PYTHON:-python3}"
BUDGET="${GPU_RUN_BUDGET_S:-570}"
TEST_TIMEOUT="${GPU_RUN_TEST_TIMEOUT_S:-240}"
STATIC_TIMEOUT="${GPU_RUN_STATIC_TIMEOUT_S:-150}"
START=$SECONDS

stages=()
report_args=()
for arg in "$@"; do
    case "$arg" in
        tests|static|report|model) stages+=("$arg") ;;
        --) ;;
        *) report_args+=("$arg") ;;
    esac
done
[[ ${#stages[@]} -eq 0 ]] && stages=(tests static report)
wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }
# The model stage measures the model-level benchmark itself: the report leaves it out then.
wants model && report_args+=(--no-model-step)

declare -A rc
order=()
elapsed() { echo $((SECONDS - START)); }
step() {  # step NAME COMMAND...: run it, record its exit code, never stop the script
    local name="$1"
    shift
    order+=("$name")
    echo
    echo "=== [$(elapsed)s] $name: $*"
    "$@"
    rc[$name]=$?
    echo "=== [$(elapsed)s] $name: exit ${rc[$name]}"
}

echo "=== gpu_run.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) stages: ${stages[*]} budget: ${BUDGET}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    || echo "nvidia-smi failed"
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| triton", triton.__version__, "| cuda available:", torch.cuda.is_available())'

# Offline: the machine has no network, and its own torch/triton must stay as they are.
step install "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .

if wants tests; then
    # One config per kernel: tuning would compile and time every config of every new shape
    # bucket, minutes on a cold cache (the determinism tests still run every config, and the
    # tuning tests tune on purpose). pytest-xdist, where the image has it, spreads the
    # compiles over the cores; --maxfail rather than -x, so one run reports several failures.
    test_args=(-q --maxfail=10 tests)
    if "$PY" -c "import xdist" 2>/dev/null; then
        test_args=(-n 8 "${test_args[@]}")
    fi
    step tests env TRITONBN_AUTOTUNE=0 timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest "${test_args[@]}"
fi

if wants static; then
    if [[ -f perf/static_checks.py ]]; then
        # Its markdown report comes back in $OUT; its compiles spread over the machine's cores.
        workers=$(nproc 2>/dev/null || echo 2)
        ((workers > 8)) && workers=8
        read -r -a static_args <<<"${GPU_RUN_STATIC_ARGS:---workers $workers --out $OUT/static_checks.md}"
        step static timeout -k 10 "$STATIC_TIMEOUT" "$PY" perf/static_checks.py "${static_args[@]}"
    else
        echo "=== static: perf/static_checks.py not present, skipped"
    fi
fi

if wants report; then
    results_dir="$("$PY" -m perf.report --print-out-dir)"
    left=$((BUDGET - $(elapsed)))
    # Stop starting cases 90 s before the end (the largest case takes about a minute with
    # its compiles), and kill 20 s before it, which leaves time to copy out.
    soft=$((left - 90))
    hard=$((left - 20))
    if ((soft < 30)); then
        echo "=== report: only ${left}s left of the budget, skipped (run: perf/gpu_run.sh report --resume)"
        rc[report]=skipped
        order+=(report)
    else
        step report timeout -k 5 "$hard" "$PY" -m perf.report --time-budget "$soft" ${report_args[@]+"${report_args[@]}"}
        if [[ "${rc[report]}" != 0 && -f "$results_dir/results.csv" ]]; then
            # Killed or failed after writing rows: draw and summarise what is there.
            step summarize "$PY" -m perf.report --summarize --out "$results_dir"
        fi
    fi
    if [[ "${rc[report]}" != skipped && -d "$results_dir" ]]; then
        for f in results.csv summary.txt model_step.csv; do
            [[ -f "$results_dir/$f" ]] && cp "$results_dir/$f" "$OUT/"
        done
        pngs=("$results_dir"/*.png)
        [[ -e "${pngs[0]}" ]] && (cd "$results_dir" && tar -czf "$OUT/plots.tar.gz" ./*.png)
        echo "=== results in $results_dir, copied to $OUT: $(ls "$OUT" | tr '\n' ' ')"
    fi
fi

if wants model; then
    # Opt-in (not a default stage: tests, static checks and the report fill the budget). The
    # same budget logic as the report's: no case starts unless its estimate (perf/model_step.py
    # ESTIMATE_S) fits 60 s before the end, and a hard stop 20 s before it; rows are written as
    # they are measured, into the committed results folder (so --resume continues there).
    model_dir="$("$PY" -m perf.report --print-out-dir)"
    left=$((BUDGET - $(elapsed)))
    soft=$((left - 60))
    hard=$((left - 20))
    if ((soft < 30)); then
        echo "=== model: only ${left}s left of the budget, skipped (run: perf/gpu_run.sh model)"
        rc[model]=skipped
        order+=(model)
    else
        read -r -a model_args <<<"${GPU_RUN_MODEL_ARGS:-}"
        step model timeout -k 5 "$hard" "$PY" -m perf.model_step --budget "$soft" --csv "$model_dir/model_step.csv" \
            ${model_args[@]+"${model_args[@]}"}
        [[ -f "$model_dir/model_step.csv" ]] && cp "$model_dir/model_step.csv" "$OUT/"
    fi
fi

echo
echo "=== gpu_run.sh done in $(elapsed)s. Exit codes:"
failed=0
for name in "${order[@]}"; do
    echo "    $name: ${rc[$name]}"
    [[ "${rc[$name]}" == 0 || "${rc[$name]}" == skipped ]] || failed=1
done
exit "$failed"
