#!/usr/bin/env bash
# One run for a machine with a GPU (or TPU): installs the environment that fits the machine's jax, runs
# the test suite, the memory sweep at the paper's size for T = 100, 400, 1000 (BPTT, ES-D-RTRL, D-RTRL, the
# online methods at K = 1 and the default --trace_chunk auto; an out-of-memory is a row), XLA's compiled
# memory analysis of the same steps (--analysis_only, nothing run: the memory_analysis step, beside the
# measured device peaks), and the README's DMS BPTT and ES-D-RTRL commands at batch 128 towards
# acc_th 0.95, capped at --epochs 20 --batches_per_epoch 25. Every step has a wall-clock cap, so that
# the whole check takes at most about 10 minutes of device time after the install (the caps below).
# Everything lands in one folder, results/accelerator-check-<timestamp>/ (or $OUT): one log per step,
# check.log (what ran, how long, ok / FAILED), machine.txt, the sweep's and the runs' folders, results.md.
#
#   bash scripts/accelerator-check.sh          # or: make accelerator-check
#   TINY=1 bash scripts/accelerator-check.sh   # toy sizes on any machine, no install, no test step (CI)
#
# Environment: PY (the python to use; default .venv/bin/python, created when missing), PYTHON (the
# interpreter that creates .venv, default python3), OUT, TINY, and the caps in seconds TESTS_S (150),
# SWEEP_S (210), ANALYSIS_S (150), DMS_S (120 for each of the two runs). The exit code is 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=${TINY:-0}
OUT=${OUT:-results/accelerator-check-$(date +%Y%m%d-%H%M%S)}
VENV=${VENV:-.venv}
PY=${PY:-$VENV/bin/python}
PYTHON=${PYTHON:-python3}
TESTS_S=${TESTS_S:-150}
SWEEP_S=${SWEEP_S:-210}
ANALYSIS_S=${ANALYSIS_S:-150}
DMS_S=${DMS_S:-120}
mkdir -p "$OUT"
FAILED=()

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/check.log"; }

# step NAME CAP_SECONDS COMMAND...: run with a wall-clock cap, output in $OUT/NAME.log
step() {
    local name=$1 cap=$2 t0 rc
    shift 2
    log "$name: $*"
    t0=$(date +%s)
    timeout --signal=INT --kill-after=30 "$cap" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        log "$name: ok ($(( $(date +%s) - t0 )) s)"
    else
        [ "$rc" -eq 124 ] && rc="124: stopped at its cap of $cap s"
        log "$name: FAILED (exit $rc, $(( $(date +%s) - t0 )) s); see $OUT/$name.log"
        FAILED+=("$name")
    fi
}

# ---------------------------------------------------------------------------------------------------
# 1. The environment
# ---------------------------------------------------------------------------------------------------
install_env() {
    if [ -x "$PY" ] && "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("brainscale", "brainstate", "jax", "optax", "orbax", "tonic", "torch")))' 2>/dev/null; then
        log "install: skipped, $PY has the environment"
        return 0
    fi
    if [ "$TINY" = 1 ]; then
        log "install: TINY=1 needs a working environment in PY=$PY (make test creates .venv)"
        return 1
    fi
    # A machine whose python already has jax >= 0.10 (Python >= 3.12, e.g. jax[cuda13] 0.11): keep that jax
    # and install the newest brain* set beside it (requirements-jax011.txt; brainscale_adapter.py bridges brainscale).
    local sys_jax
    sys_jax=$("$PYTHON" -c 'import sys, jax; v = tuple(int(p) for p in jax.__version__.split(".")[:2]); print("new" if sys.version_info >= (3, 12) and v >= (0, 10) else "old")' 2>/dev/null || echo none)
    log "install: $PYTHON has jax: $sys_jax"
    if [ "$sys_jax" = new ]; then
        "$PYTHON" -m venv --system-site-packages "$VENV" &&
        "$PY" -m pip install -r requirements-jax011.txt &&
        { "$PY" -c 'import torch' 2>/dev/null ||
          "$PY" -m pip install torch --extra-index-url https://download.pytorch.org/whl/cpu; }
    else
        # The exact pins (jax 0.8.0); the accelerator's jax of the same version on top.
        "$PYTHON" -m venv "$VENV" &&
        "$PY" -m pip install -r requirements.txt --extra-index-url https://download.pytorch.org/whl/cpu || return 1
        if command -v nvidia-smi > /dev/null; then
            "$PY" -m pip install 'jax[cuda12]==0.8.0'
        elif [ -e /dev/accel0 ] || [ -n "${TPU_NAME:-}" ]; then
            "$PY" -m pip install 'jax[tpu]==0.8.0' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
        fi
    fi
}
log "accelerator check in $OUT (TINY=$TINY)"
t_install=$(date +%s)
if install_env > "$OUT/install.log" 2>&1; then
    log "install: ok ($(( $(date +%s) - t_install )) s)"
else
    log "install: FAILED; see $OUT/install.log"
    exit 1
fi
{
    echo "date: $(date -Is)"; uname -a
    "$PY" -c 'import sys, jax; from importlib.metadata import version as v; print("python", sys.version.split()[0]); print(*(f"{m} {v(m)}" for m in ("jax", "jaxlib", "brainstate", "brainscale"))); print("devices", jax.devices())'
    command -v nvidia-smi > /dev/null && nvidia-smi
    "$PY" -m pip freeze
} > "$OUT/machine.txt" 2>&1
log "devices: $(grep '^devices' "$OUT/machine.txt")"

# ---------------------------------------------------------------------------------------------------
# 2. Sizes
# ---------------------------------------------------------------------------------------------------
# The README's DMS commands (as written; --devices 3 falls back to the device that exists, with a warning).
DMS_BPTT="--epochs 2000 --method bptt --dataset dms --t_delay 1000 --tau_I2 1500 --tau_neu 100 --tau_syn 100
  --n_rec 200 --lr 0.001 --A2 1 --optimizer adam --devices 3 --t_fixation 10. --spk_fun relu --acc_th 0.95
  --n_data_worker 4 --dt 1. --ff_scale 6 --rec_scale 2"
DMS_ES="--epochs 2000 --method expsm_diag --etrace_decay 0.99 --vjp_time t --dataset dms --t_delay 1000
  --tau_I2 1500 --tau_neu 100 --tau_syn 100 --n_rec 200 --lr 0.001 --A2 1 --optimizer adam --devices 3
  --t_fixation 10. --spk_fun relu --acc_th 0.95 --n_data_worker 4 --dt 1. --ff_scale 6 --rec_scale 2"
DMS_CAP="--batch_size 128 --epochs 20 --batches_per_epoch 25 --n_test_trials 512 --no_progress"
SWEEP="--preset paper --lengths 100,400,1000 --repeats 2 --timeout 100 --trace_chunk 1,auto"
ANALYSIS="--preset paper --lengths 100,400,1000 --trace_chunk 1,auto --analysis_only --timeout 100"
TESTS=(tests)
if [ "$TINY" = 1 ]; then
    DMS_CAP="$DMS_CAP --devices cpu --t_fixation 5 --t_sample 20 --t_delay 20 --t_test 20 --n_rec 16
      --batch_size 8 --epochs 2 --batches_per_epoch 3 --n_test_trials 16 --n_data_worker 0
      --tau_neu 20 --tau_syn 20 --tau_I2 100"
    SWEEP="--preset cpu --lengths 4 --n_in 20 --n_rec 16 --n_layer 1 --n_out 3 --batch_size 4 --repeats 1
      --devices cpu --timeout 60 --trace_chunk 1,auto"
    ANALYSIS="$SWEEP --analysis_only"
    TESTS=()   # the test step is skipped at toy size (CI runs the suite itself)
fi

# ---------------------------------------------------------------------------------------------------
# 3. The checks
# ---------------------------------------------------------------------------------------------------
if [ ${#TESTS[@]} -gt 0 ]; then
    step tests "$TESTS_S" "$PY" -m pytest -q "${TESTS[@]}"
else
    log "tests: skipped (TINY=1)"
fi
# shellcheck disable=SC2086
step memory_sweep "$SWEEP_S" "$PY" task-memory-and-speed-evaluation-tpu.py $SWEEP --out_dir "$OUT/memory_speed"
# shellcheck disable=SC2086
step memory_analysis "$ANALYSIS_S" "$PY" task-memory-and-speed-evaluation-tpu.py $ANALYSIS --out_dir "$OUT/memory_analysis"
# shellcheck disable=SC2086
step dms_bptt "$DMS_S" "$PY" task-rsnn-long-term-dependency.py $DMS_BPTT $DMS_CAP --out_dir "$OUT/dms-bptt"
# shellcheck disable=SC2086
step dms_expsm_diag "$DMS_S" "$PY" task-rsnn-long-term-dependency.py $DMS_ES $DMS_CAP --out_dir "$OUT/dms-expsm_diag"
step results_table 60 "$PY" scripts/results_table.py "$OUT"

[ -f "$OUT/memory_speed/results.md" ] && { echo; cat "$OUT/memory_speed/results.md"; } | tee -a "$OUT/check.log"
[ -f "$OUT/memory_analysis/results.md" ] && { echo; cat "$OUT/memory_analysis/results.md"; } | tee -a "$OUT/check.log"
[ -f "$OUT/results.md" ] && { echo; cat "$OUT/results.md"; } | tee -a "$OUT/check.log"
if [ ${#FAILED[@]} -gt 0 ]; then
    log "done: FAILED steps: ${FAILED[*]}; every result and log is in $OUT"
    exit 1
fi
log "done: every step ok; every result and log is in $OUT"
