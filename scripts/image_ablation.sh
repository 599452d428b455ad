#!/usr/bin/env bash
# Why the README image size learns: the ablation of docs/image-classification.md, "Why the README size learns".
# Each row is the README N-MNIST command (--method bptt or expsm_diag) at 3 x 128 neurons, batch 32 and
# 60 batches, with the flags named in its folder changed from the defaults; then one table of all of them.
#   bash scripts/image_ablation.sh DATA_DIR [OUT]      (DATA_DIR holds NMNIST/, e.g. from synthetic_events.py)
set -euo pipefail
DATA=${1:?usage: bash scripts/image_ablation.sh DATA_DIR [OUT]}
OUT=${2:-results/image-ablation}
PY=${PY:-python}
mkdir -p "$OUT"
run() {  # name, method, init flags
  local name=$1 method=$2; shift 2
  [ -f "$OUT/$name-$method/summary.json" ] && return
  $PY task-image-classification.py --devices cpu --dataset nmnist --data_length 400 --epoch 1 --n_layer 3 \
    --n_rec 128 --method "$method" --model lif-delta --exp_name ablation --warmup_ratio 0. --data_dir "$DATA" \
    --batch_size 32 --batches_per_epoch 60 --no_progress --out_dir "$OUT/$name-$method" "$@" \
    > "$OUT/$name-$method.log" 2>&1
}
for method in bptt expsm_diag; do
  run authors-init0-ff10-rec2 $method --init_rate 0 --ff_scale 10 --rec_scale 2
  run detached-reset $method --detach_reset 1
  run defaults $method
done
run init0-ff100 bptt --init_rate 0 --ff_scale 100
$PY scripts/results_table.py "$OUT"
