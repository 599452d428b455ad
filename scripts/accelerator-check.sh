#!/usr/bin/env bash
# One run for a machine with a GPU (or TPU), sized to fit one device run of at most 10 minutes, start to
# table (docs/accelerator-check.md has the plan and its caps):
#   1. the environment: the python that has jax is used as it is (no install of jax when jax imports);
#      without jax, exact pins jax[cuda13]==0.11.2 (NVIDIA driver >= 580) or jax[cuda12]==0.11.2; no torch,
#      no extra index;
#   2. a handful of exactness tests (online gradients against BPTT / brainscale), not the suite;
#   3. the memory and speed sweep at the paper's size (3 x 512 LIF, 32768 inputs, batch 128) at T = 100,
#      250, 500, 1000: scripts/accelerator_sweep.py, one worker process per method looping over T, the
#      methods interleaved at each T, the input drawn on the device, a cap per row, the table written
#      after every row;
#   4. the paper's three DMS commands (BPTT, ES-D-RTRL, D-RTRL) for a fixed number of batches each: the
#      device's seconds per batch;
#   5. the results table of the DMS runs.
# Everything lands in one folder, results/accelerator-check-<timestamp>/ (or $OUT): check.log (each step,
# its seconds, ok / FAILED), one log per step, machine.txt, sweep/ (results.md, results.csv), dms-*/,
# results.md.
#
#   bash scripts/accelerator-check.sh          # or: make accelerator-check
#   TINY=1 bash scripts/accelerator-check.sh   # toy sizes on the CPU (CI), with caps that only stop a hang
#
# Environment: PY (the python; default .venv/bin/python where it exists, else python3), OUT, TINY, and the
# caps in seconds: TESTS_S (60), ROW_S (25 per sweep row; STARTUP_S = 30 more for the first T), DMS_S (50
# for each of the three DMS runs), DMS_BATCHES (6 batches each). The exit code is 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=${TINY:-0}
OUT=${OUT:-results/accelerator-check-$(date +%Y%m%d-%H%M%S)}
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "$TINY" = 1 ]; then  # toy sizes: the caps only guard against a hang (a CPU shared with others is slow)
    TESTS_S=${TESTS_S:-300} ROW_S=${ROW_S:-120} STARTUP_S=${STARTUP_S:-120} DMS_S=${DMS_S:-300}
fi
TESTS_S=${TESTS_S:-60}
ROW_S=${ROW_S:-25}
STARTUP_S=${STARTUP_S:-30}
DMS_S=${DMS_S:-50}
DMS_BATCHES=${DMS_BATCHES:-6}
mkdir -p "$OUT"
FAILED=()

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/check.log"; }

# step NAME CAP_SECONDS COMMAND...: run with a wall-clock cap, output in $OUT/NAME.log
step() {
    local name=$1 cap=$2 t0 rc
    shift 2
    log "$name: $*"
    t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
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
# 1. The environment: the jax that is there
# ---------------------------------------------------------------------------------------------------
NEEDED='("jax", "brainscale", "brainstate", "braintools", "optax", "orbax.checkpoint", "matplotlib", "pytest")'
has() { "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m.split('.')[0]) is None for m in $1))" 2>/dev/null; }
install_env() {
    if has "$NEEDED"; then
        log "install: skipped, $PY has every package"
        return 0
    fi
    if [ "$TINY" = 1 ]; then
        log "install: TINY=1 needs a working environment in PY=$PY (make test creates .venv)"
        return 1
    fi
    if ! has '("jax",)'; then
        # no jax: the exact pins of requirements-jax011.txt, with the CUDA wheels of the driver
        local extra=""
        if command -v nvidia-smi > /dev/null; then
            local driver
            driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
            if [ "${driver:-0}" -ge 580 ]; then extra="[cuda13]"; else extra="[cuda12]"; fi
            log "install: NVIDIA driver $driver: jax${extra}"
        fi
        "$PY" -m pip install "jax${extra}==0.11.2" "jaxlib==0.11.2" || return 1
    fi
    # the rest beside the machine's jax (its jax lines left out: the jax that is there stays)
    grep -v -E '^(jax|jaxlib|numpy)==' requirements-jax011.txt > "$OUT/requirements-besides-jax.txt"
    "$PY" -m pip install -r "$OUT/requirements-besides-jax.txt"
}
log "accelerator check in $OUT (TINY=$TINY, PY=$PY)"
# The package rsnn from this checkout, whether or not PY has it installed (editable: make test does that).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t_install=$(date +%s)
if install_env >> "$OUT/install.log" 2>&1; then
    log "install: ok ($(( $(date +%s) - t_install )) s)"
else
    log "install: FAILED; see $OUT/install.log"
    exit 1
fi
{
    echo "date: $(date -Is)"; uname -a
    "$PY" -c 'import sys, jax; from importlib.metadata import version as v; print("python", sys.version.split()[0]); print(*(f"{m} {v(m)}" for m in ("jax", "jaxlib", "numpy", "brainstate", "brainscale"))); print("devices", jax.devices())'
    command -v nvidia-smi > /dev/null && nvidia-smi
} > "$OUT/machine.txt" 2>&1
log "devices: $(grep '^devices' "$OUT/machine.txt")"

# ---------------------------------------------------------------------------------------------------
# 2. Sizes
# ---------------------------------------------------------------------------------------------------
# The README's DMS commands (as written; --devices 3 falls back to the device that exists, with a warning),
# for DMS_BATCHES batches of 128 trials each, data in the main process (no torch DataLoader workers).
DMS_COMMON="--dataset dms --t_delay 1000 --tau_I2 1500 --tau_neu 100 --tau_syn 100 --n_rec 200 --lr 0.001 --A2 1
  --optimizer adam --devices 3 --t_fixation 10. --spk_fun relu --acc_th 0.95 --n_data_worker 4 --dt 1.
  --ff_scale 6 --rec_scale 2"
DMS_BPTT="--epochs 2000 --method bptt $DMS_COMMON"
DMS_ES="--epochs 2000 --method expsm_diag --etrace_decay 0.99 --vjp_time t $DMS_COMMON"
DMS_DIAG="--epochs 2000 --method diag $DMS_COMMON"
DMS_CAP="--epochs 1 --batches_per_epoch $DMS_BATCHES --n_test_trials 128 --acc_th 1.1 --n_data_worker 0 --no_progress"
SWEEP=(--cap "$ROW_S" --startup "$STARTUP_S")
# D-RTRL = BPTT where no path is cut; the chunked traces (the default K) = brainscale step by step (K = 1)
EXACT=(tests/test_gradients.py::test_drtrl_exact_without_recurrence_and_memoryless_readout
       "tests/test_chunked_traces.py::test_chunked_gradient_equals_brainscale_step_by_step[expsm_diag-lif-delta]"
       "tests/test_chunked_traces.py::test_chunked_gradient_equals_brainscale_step_by_step[diag-lif-delta]")
if [ "$TINY" = 1 ]; then
    DMS_CAP="$DMS_CAP --devices cpu --t_fixation 5 --t_sample 20 --t_delay 20 --t_test 20 --n_rec 16
      --batch_size 8 --batches_per_epoch 2 --n_test_trials 8 --tau_neu 20 --tau_syn 20 --tau_I2 100"
    SWEEP+=(--tiny --devices cpu)
fi

# ---------------------------------------------------------------------------------------------------
# 3. The checks
# ---------------------------------------------------------------------------------------------------
step exactness_tests "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider "${EXACT[@]}"
# the sweep's own caps (per row) end it; this cap only guards against a hang
n_rows=$(( 3 * 4 ))
step memory_sweep $(( n_rows * ROW_S + STARTUP_S + 30 )) "$PY" scripts/accelerator_sweep.py --out "$OUT/sweep" "${SWEEP[@]}"
# shellcheck disable=SC2086
step dms_bptt "$DMS_S" "$PY" task-rsnn-long-term-dependency.py $DMS_BPTT $DMS_CAP --out_dir "$OUT/dms-bptt"
# shellcheck disable=SC2086
step dms_expsm_diag "$DMS_S" "$PY" task-rsnn-long-term-dependency.py $DMS_ES $DMS_CAP --out_dir "$OUT/dms-expsm_diag"
# shellcheck disable=SC2086
step dms_diag "$DMS_S" "$PY" task-rsnn-long-term-dependency.py $DMS_DIAG $DMS_CAP --out_dir "$OUT/dms-diag"
step results_table 30 "$PY" scripts/results_table.py "$OUT"

[ -f "$OUT/sweep/results.md" ] && { echo; cat "$OUT/sweep/results.md"; } | tee -a "$OUT/check.log"
[ -f "$OUT/results.md" ] && { echo; cat "$OUT/results.md"; } | tee -a "$OUT/check.log"
if [ ${#FAILED[@]} -gt 0 ]; then
    log "done: FAILED steps: ${FAILED[*]}; every result and log is in $OUT"
    exit 1
fi
log "done: every step ok; every result and log is in $OUT"
