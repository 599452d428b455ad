#!/usr/bin/env bash
# Seeded tiny DMS runs of every method on trials and on a stream, to compare two commits' behaviour:
#   bash benchmarks/behaviour_runs.sh REPO OUT   (REPO: a checkout with .venv; OUT: a new folder)
#   python benchmarks/compare_runs.py OUT_BEFORE OUT_AFTER   (every loss, accuracy, gradient norm, rtol 1e-4)
REPO=$1; OUT=$2; set -u; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); cd "$REPO"
T='--t_fixation 5 --t_sample 20 --t_delay 20 --t_test 20 --devices cpu --no_progress --seed 3'
for m in bptt diag expsm_diag eprop ottt snap1 uoro fptt; do
  .venv/bin/python task-rsnn-long-term-dependency.py $T --n_rec 16 --batch_size 8 --batches_per_epoch 3 --n_test_trials 16 --tau_neu 20 --tau_syn 20 --tau_I2 100 --acc_th 1.1 --epochs 2 --method $m --out_dir $OUT/trials-$m > $OUT/trials-$m.log 2>&1 || echo "FAIL trials $m"
  .venv/bin/python task-rsnn-long-term-dependency.py $T --protocol stream --n_rec 12 --batch_size 4 --t_iti 5-15 --update_every 30 --eval_every_trials 2 --n_test_trials 8 --stream_trials 4 --method $m --out_dir $OUT/stream-$m > $OUT/stream-$m.log 2>&1 || echo "FAIL stream $m"
done
