"""Compare metrics.csv and batches.csv of two folders of runs (benchmarks/behaviour_runs.sh) number by number,
timing columns left out:  python benchmarks/compare_runs.py BEFORE AFTER  (exit code 1 if any differs)."""
import csv, math, os, sys
SKIP = ('time', 'second', '_s', 'rss', 'mb', 'wall', 'elapsed', 'timestamp', 'date', 'eta')
def rows(p):
    return list(csv.DictReader(open(p))) if os.path.exists(p) else None
def num(v):
    try: return float(v)
    except (TypeError, ValueError): return None
a, b = sys.argv[1], sys.argv[2]; bad = 0; n = 0
for run in sorted(d for d in os.listdir(a) if os.path.isdir(os.path.join(a, d))):
    for f in ('metrics.csv', 'batches.csv'):
        ra, rb = rows(os.path.join(a, run, f)), rows(os.path.join(b, run, f))
        if ra is None and rb is None: continue
        if ra is None or rb is None or len(ra) != len(rb):
            print('DIFF', run, f, 'rows', None if ra is None else len(ra), None if rb is None else len(rb)); bad += 1; continue
        for i, (x, y) in enumerate(zip(ra, rb)):
            for k in x:
                if any(s in k.lower() for s in SKIP): continue
                u, v = num(x[k]), num(y.get(k))
                if u is None or v is None:
                    continue
                n += 1
                if not (math.isclose(u, v, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(u) and math.isnan(v))):
                    print('DIFF', run, f, i, k, u, v); bad += 1
print(f'{n} numbers compared, {bad} differ')
sys.exit(1 if bad else 0)
