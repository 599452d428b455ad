"""A toy task script for the benchmark's worker tests (tests/test_benchmark_workers.py): it writes a run folder as
the task scripts do (config.json, metrics.csv with val_acc, checkpoints/last/<epoch>, summary.json), takes
--resume RUN_DIR with a larger --epochs, sleeps --sleep seconds per epoch, and appends to $TOY_LOG one line per
start: 'fresh RUN_DIR' or 'resume RUN_DIR EPOCH'."""
import argparse
import json
import math
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument('--out_dir')
p.add_argument('--resume')
p.add_argument('--epochs', type=int, default=1)
p.add_argument('--lr', type=float, default=1e-3)
p.add_argument('--sleep', type=float, default=0.)
p.add_argument('--no_progress', action='store_true')
p.add_argument('--seed', type=int, default=0)
args, _ = p.parse_known_args()
run_dir = args.resume or args.out_dir
os.makedirs(os.path.join(run_dir, 'checkpoints', 'last'), exist_ok=True)
if args.resume:
    with open(os.path.join(run_dir, 'config.json')) as f:
        cfg = json.load(f)
    cfg['epochs'] = args.epochs
    done = max([int(n) for n in os.listdir(os.path.join(run_dir, 'checkpoints', 'last'))] + [0])
else:
    cfg = dict(vars(args))
    done = 0
    with open(os.path.join(run_dir, 'metrics.csv'), 'w') as f:
        f.write('epoch,batches,test_acc,val_acc\n')
with open(os.environ['TOY_LOG'], 'a') as f:
    f.write(f'fresh {run_dir}\n' if not args.resume else f'resume {run_dir} {done}\n')
with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(cfg, f)
# the validation accuracy peaks at lr = 1e-2 and grows with the epochs
for epoch in range(done + 1, cfg['epochs'] + 1):
    time.sleep(args.sleep)
    acc = (1 - 0.1 * (math.log10(cfg['lr']) + 2) ** 2) * (1 - 0.5 ** epoch)
    with open(os.path.join(run_dir, 'metrics.csv'), 'a') as f:
        f.write(f'{epoch},{epoch},{acc},{acc}\n')
    os.makedirs(os.path.join(run_dir, 'checkpoints', 'last', str(epoch)), exist_ok=True)
with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
    json.dump(dict(stopped_because='epochs', test_acc=acc), f)
sys.exit(0)
