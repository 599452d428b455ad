"""Realistic synthetic N-MNIST and SHD recordings in the official on-disk formats that tonic reads.

N-MNIST: scikit-learn's 1797 bundled 8x8 handwritten-digit scans (`sklearn.datasets.load_digits`, real
handwriting from 43 writers), upsampled to a 21x21 digit in a 28x28 MNIST-like box (cubic), augmented per
recording (shift, rotation, scale, stroke intensity), and seen through the 34x34 sensor while it makes
the three saccades of the real set (three 100 ms linear movements along a triangle, 300 ms in all). A
simple DVS pixel model turns the moving image into events: per pixel a reference log intensity; an ON
(OFF) event each time the log intensity rose (fell) by more than the pixel's contrast threshold since its
last event (threshold 0.18 +- 0.03 per pixel), a refractory period, plus uniform background noise.
Timestamps in microseconds, sorted. Scans are split into disjoint train / test scans; asking for more
recordings than scans reuses scans with fresh augmentation.

SHD: 20 "words" over 700 tonotopic channels. Words are sequences of 2-4 syllables taken from a shared
inventory of syllables, each a set of formant trajectories (bands of activity sweeping across
neighbouring channels) with an onset burst; the 20 words are 10 syllable sets, each spoken in two
orders, so no class owns a channel band and the time-collapsed channel counts cannot tell a word from its
reversal. Per utterance: the speaker's frequency shift (a few %), speaking rate (time warp +-20 %),
loudness, timing and formant jitter; Poisson spikes along the active channels; background noise.
Train and test use disjoint speakers, as the real SHD does.

    python scripts/synthetic_events.py --dataset nmnist --out DIR --n_train 6000 --n_test 1000 --seed 0
    python scripts/synthetic_events.py --dataset shd --out DIR --n_train 2000 --n_test 500 --seed 0

Then `python task-image-classification.py --dataset nmnist --data_dir DIR ...` reads DIR/NMNIST.

tonic's N-MNIST existence check wants >= 10000 .bin files per split. The generator writes a marker file
NMNIST/SYNTHETIC.json; event_data.open_tonic_dataset accepts a folder with that marker and at least one
.bin per split (it says so in one line), and leaves the check unchanged for any other folder. With
--n_train and --n_test >= 10000 tonic's own check passes anyway.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rsnn import event_data

SYNTHETIC_MARKER = event_data.SYNTHETIC_MARKER

# --------------------------------------------------------------------------------------------
# N-MNIST
# --------------------------------------------------------------------------------------------

SENSOR = 34
BOX = 28                    # MNIST box; the digit itself is about 21x21 inside it, as in MNIST
DIGIT = 21
SACCADE_US = 100_000
STEP_US = 500               # rendering step of the moving image
# Image displacement (pixels) at the saccade corners: a triangle, 4-5 px per leg (real N-MNIST moves
# the sensor so that the image shifts by a few pixels per saccade).
TRIANGLE = np.array([[-2.5, 2.], [0., -2.5], [2.5, 2.], [-2.5, 2.]])


def load_digit_scans():
    """The 1797 scans as float images in [0, 1], 8x8, and their labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32) / 16., d.target.astype(np.int64)


def upsample_scans(images: np.ndarray) -> np.ndarray:
    """8x8 scans -> BOX x BOX images: a cubic zoom to DIGIT x DIGIT, centred, clipped to [0, 1]."""
    from scipy.ndimage import zoom
    out = np.zeros((len(images), BOX, BOX), np.float32)
    o = (BOX - DIGIT) // 2
    for i, im in enumerate(images):
        z = zoom(np.pad(im, 1), (DIGIT + 2 * DIGIT / 8) / 10, order=3)
        c = (z.shape[0] - DIGIT) // 2
        out[i, o:o + DIGIT, o:o + DIGIT] = np.clip(z[c:c + DIGIT, c:c + DIGIT], 0, 1)
    return out


def split_scans(labels: np.ndarray, n_test_scans: int = 297, seed: int = 0):
    """Disjoint train / test scan indices (fixed by the seed)."""
    order = np.random.default_rng([seed, 11]).permutation(len(labels))
    return np.sort(order[n_test_scans:]), np.sort(order[:n_test_scans])


def saccade_offsets(t_us: np.ndarray) -> np.ndarray:
    """Image displacement (n, 2) at times t_us: linear legs along TRIANGLE, SACCADE_US each."""
    leg = np.clip(t_us // SACCADE_US, 0, 2).astype(int)
    f = np.clip((t_us - leg * SACCADE_US) / SACCADE_US, 0, 1)[:, None]
    return TRIANGLE[leg] * (1 - f) + TRIANGLE[leg + 1] * f


def _bilinear(images: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """images (B, H, W) sampled at float rows r, cols c (B, P); zero outside."""
    B, H, W = images.shape
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    fr, fc = (r - r0).astype(np.float32), (c - c0).astype(np.float32)
    flat = images.reshape(B, -1)
    out = np.zeros(r.shape, np.float32)
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        idx = np.where(ok, rr * W + cc, 0)
        out += w * np.where(ok, np.take_along_axis(flat, idx, axis=1), 0.)
    return out


def simulate_nmnist(images: np.ndarray, rng: np.random.Generator, *, threshold: float = 0.18,
                    threshold_sigma: float = 0.03, refractory_us: int = 300, background: float = 0.3,
                    eps: float = 0.02, noise_events: float = 40., augment: bool = True):
    """DVS recordings of BOX x BOX images (B, BOX, BOX) in [0, 1] moved through three saccades.

    Returns a list of (x, y, t_us, p) arrays per recording, sorted by t."""
    B = len(images)
    # Per-recording augmentation: rotation, scale, shift, stroke intensity.
    if augment:
        angle = np.deg2rad(rng.uniform(-12, 12, B))
        scale = rng.uniform(0.88, 1.12, B)
        shift = rng.uniform(-1.5, 1.5, (B, 2))
        gain = rng.uniform(0.5, 0.9, B)
    else:
        angle, scale, shift, gain = np.zeros(B), np.ones(B), np.zeros((B, 2)), np.full(B, 0.7)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    # The augmented image on a canvas = sensor + MARGIN pixels on each side (bilinear, once per recording);
    # the saccades then translate the canvas under the sensor: the same sub-pixel shift for all pixels.
    M = int(np.ceil(np.abs(TRIANGLE).max())) + 1
    size = SENSOR + 2 * M
    ys, xs = np.mgrid[0:size, 0:size]
    xs, ys = xs.ravel().astype(np.float64), ys.ravel().astype(np.float64)
    centre_c, centre_b = (size - 1) / 2, (BOX - 1) / 2
    u = xs[None] - centre_c - shift[:, :1]
    v = ys[None] - centre_c - shift[:, 1:]
    c = cos[:, None] * u + sin[:, None] * v + centre_b
    r = -sin[:, None] * u + cos[:, None] * v + centre_b
    canvas = np.log(background + eps + gain[:, None] * _bilinear(images, r, c)).astype(np.float32)
    canvas = canvas.reshape(B, size, size)
    thr = np.clip(threshold + threshold_sigma * rng.standard_normal((B, 2, SENSOR * SENSOR)), 0.05, None)
    thr_off, thr_on = thr[:, 0].astype(np.float32), thr[:, 1].astype(np.float32)

    def log_frame(t_us):
        # the image moves by d: the sensor pixel (x, y) sees canvas (x + M - d_x, y + M - d_y)
        dx, dy = saccade_offsets(np.asarray([t_us]))[0]
        cx, cy = M - dx, M - dy
        c0, r0 = int(np.floor(cx)), int(np.floor(cy))
        fc, fr = cx - c0, cy - r0
        out = ((1 - fr) * (1 - fc)) * canvas[:, r0:r0 + SENSOR, c0:c0 + SENSOR]
        out += ((1 - fr) * fc) * canvas[:, r0:r0 + SENSOR, c0 + 1:c0 + 1 + SENSOR]
        out += (fr * (1 - fc)) * canvas[:, r0 + 1:r0 + 1 + SENSOR, c0:c0 + SENSOR]
        out += (fr * fc) * canvas[:, r0 + 1:r0 + 1 + SENSOR, c0 + 1:c0 + 1 + SENSOR]
        return out.reshape(B, -1)

    ref = log_frame(0)
    last = np.full(ref.shape, -10 ** 9, np.int64)
    max_per_step = max(1, STEP_US // refractory_us)
    parts = []
    for k in range(1, 3 * SACCADE_US // STEP_US + 1):
        t0 = (k - 1) * STEP_US
        diff = log_frame(k * STEP_US) - ref
        on = diff >= thr_on
        fire = (on | (-diff >= thr_off)) & (t0 - last >= refractory_us)
        if not fire.any():
            continue
        b, pix = np.nonzero(fire)
        d = diff[b, pix]
        th = np.where(d > 0, thr_on[b, pix], thr_off[b, pix])
        cnt = np.minimum(np.floor(np.abs(d) / th).astype(np.int64), max_per_step)
        ref[b, pix] += np.sign(d) * cnt * th                 # the reference moves by whole thresholds
        last[b, pix] = t0 + (cnt - 1) * STEP_US // cnt
        # the i-th of n events in a step falls in the i-th of n equal slices of the step
        rep = np.repeat(np.arange(len(b)), cnt)
        i = np.arange(len(rep)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        t = t0 + ((i + rng.random(len(rep))) * STEP_US / cnt[rep]).astype(np.int64)
        parts.append(np.stack([b[rep], pix[rep], t, (d[rep] > 0).astype(np.int64)], 1))
    m = rng.poisson(noise_events, B)
    noise = np.stack([np.repeat(np.arange(B), m), rng.integers(0, SENSOR * SENSOR, m.sum()),
                      rng.integers(0, 3 * SACCADE_US, m.sum()), rng.integers(0, 2, m.sum())], 1)
    ev = np.concatenate(parts + [noise])
    ev = ev[np.lexsort((ev[:, 2], ev[:, 0]))]
    bounds = np.searchsorted(ev[:, 0], np.arange(B + 1))
    out = []
    for j in range(B):
        e = ev[bounds[j]:bounds[j + 1]]
        out.append((e[:, 1] % SENSOR, e[:, 1] // SENSOR, e[:, 2], e[:, 3]))
    return out


def nmnist_recordings(n_train: int, n_test: int, seed: int = 0, chunk: int = 500, **dvs):
    """{'train': [(label, x, y, t_us, p), ...], 'test': [...]} from disjoint train / test scans."""
    images, labels = load_digit_scans()
    big = upsample_scans(images)
    train_scans, test_scans = split_scans(labels, seed=seed)
    rng = np.random.default_rng([seed, 1])
    out = {}
    for split, scans, n in (('train', train_scans, n_train), ('test', test_scans, n_test)):
        # every scan once (shuffled), then again with fresh augmentation, until n recordings
        reps = -(-n // len(scans)) if n else 0
        pick = np.concatenate([rng.permutation(scans) for _ in range(reps)])[:n] if n else np.zeros(0, int)
        rows = []
        for s in range(0, n, chunk):
            idx = pick[s:s + chunk]
            for lab, (x, y, t, p) in zip(labels[idx], simulate_nmnist(big[idx], rng, **dvs)):
                rows.append((int(lab), x, y, t, p))
        out[split] = rows
    return out


def nmnist_features(rows, first_saccade: bool = True) -> np.ndarray:
    """Per-pixel event counts (n, 2312) in tonic's frame order p * 1156 + y * 34 + x."""
    X = np.zeros((len(rows), 2 * SENSOR * SENSOR), np.float32)
    for i, (_, x, y, t, p) in enumerate(rows):
        keep = t < SACCADE_US if first_saccade else slice(None)
        np.add.at(X[i], (p * SENSOR * SENSOR + y * SENSOR + x)[keep], 1)
    return X


def nmnist_stats(samples) -> dict:
    rows = samples['train'] + samples['test']
    n = np.array([len(r[3]) for r in rows])
    first = np.array([(r[3] < SACCADE_US).sum() for r in rows])
    on = np.array([r[4].sum() for r in rows])
    span = np.array([r[3][-1] - r[3][0] for r in rows if len(r[3])])
    return dict(events_mean=float(n.mean()), events_std=float(n.std()), first_saccade_mean=float(first.mean()),
                first_saccade_std=float(first.std()), on_fraction=float(on.sum() / n.sum()),
                span_ms_mean=float(span.mean() / 1000),
                sorted=bool(all(np.all(np.diff(r[3]) >= 0) for r in rows)))


# --------------------------------------------------------------------------------------------
# SHD
# --------------------------------------------------------------------------------------------

N_CHANNELS = 700
N_WORDS = 20
N_SYLLABLES = 12
TRAIN_SPEAKERS = tuple(range(10))      # disjoint from the test speakers, as in the real SHD
TEST_SPEAKERS = (10, 11, 12)
BIN_S = 0.002                          # resolution of the rate map
TEMPLATE_SEED = 2024                   # words and speakers do not depend on --seed


def syllable_inventory():
    """N_SYLLABLES syllables: duration, three formant trajectories (start / end channel, width,
    amplitude) and an optional broadband onset burst (a consonant)."""
    rng = np.random.default_rng([TEMPLATE_SEED, 1])
    out = []
    for _ in range(N_SYLLABLES):
        start = np.array([rng.uniform(60, 220), rng.uniform(220, 450), rng.uniform(450, 640)])
        out.append(dict(duration=rng.uniform(0.12, 0.22), f_start=start,
                        f_end=np.clip(start + rng.uniform(-70, 70, 3), 20, 680),
                        width=rng.uniform(8, 15, 3), amp=rng.uniform(0.6, 1.0, 3),
                        burst=rng.random() < 0.5, burst_centre=rng.uniform(300, 650),
                        burst_len=rng.uniform(0.015, 0.03)))
    return out


def word_templates():
    """20 words = 10 syllable sets of 2, 3 or 4 syllables, each spoken in its order and reversed: a word
    and its reversal hold the same syllables, so their time-collapsed channel counts match."""
    rng = np.random.default_rng([TEMPLATE_SEED, 2])
    words = []
    for k in range(N_WORDS // 2):
        seq = list(rng.choice(N_SYLLABLES, 2 + k % 3, replace=False))
        words += [seq, seq[::-1]]
    return words


def speaker_params(speaker: int) -> dict:
    rng = np.random.default_rng([TEMPLATE_SEED, 3, speaker])
    return dict(shift=rng.uniform(0.94, 1.06), rate=rng.uniform(0.85, 1.15), loudness=rng.uniform(0.7, 1.3))


def utterance(word: int, speaker: int, rng: np.random.Generator, *, peak_hz: float = 220.,
              noise_hz: float = 1.5, syllables=None, words=None):
    """One utterance: (units uint16, times_s float64), sorted by time."""
    syllables = syllables or syllable_inventory()
    words = words or word_templates()
    sp = speaker_params(speaker)
    rate = sp['rate'] * rng.uniform(0.92, 1.08)                       # overall +-20 % with the speaker's
    shift = sp['shift'] * (1 + 0.01 * rng.standard_normal())
    loud = sp['loudness'] * rng.uniform(0.8, 1.2)
    seq = words[word]
    t = rng.uniform(0.02, 0.08)                                       # leading silence
    pieces = []
    for s in seq:
        syl = syllables[s]
        dur = syl['duration'] / rate
        t = max(t + 0.01 * rng.standard_normal(), 0.)
        pieces.append((t, dur, syl))
        t += dur + rng.uniform(0.02, 0.06) / rate                     # a short pause between syllables
    total = t + rng.uniform(0.02, 0.08)
    n_bins = int(np.ceil(total / BIN_S))
    ch = np.arange(N_CHANNELS, dtype=np.float32)
    lam = np.full((n_bins, N_CHANNELS), noise_hz * BIN_S, np.float32)
    for start, dur, syl in pieces:
        b0, b1 = int(start / BIN_S), min(n_bins, int((start + dur) / BIN_S) + 1)
        tt = (np.arange(b0, b1) * BIN_S - start) / dur                # 0..1 within the syllable
        env = np.clip(tt / 0.1, 0, 1) * np.clip((1 - tt) / 0.25, 0, 1)  # attack, decay
        for f in range(3):
            centre = (syl['f_start'][f] + (syl['f_end'][f] - syl['f_start'][f]) * tt) * shift
            centre = centre + 4 * rng.standard_normal()
            g = np.exp(-0.5 * ((ch[None] - centre[:, None]) / syl['width'][f]) ** 2)
            lam[b0:b1] += (peak_hz * BIN_S * loud * syl['amp'][f]) * env[:, None] * g
        if syl['burst']:
            nb = max(1, int(syl['burst_len'] / BIN_S))
            g = np.exp(-0.5 * ((ch - syl['burst_centre'] * shift) / 60.) ** 2)
            lam[max(0, b0 - nb):b0] += 0.5 * peak_hz * BIN_S * loud * g[None]
    counts = rng.poisson(lam)
    b, u = np.nonzero(counts)
    n = counts[b, u]
    b, u = np.repeat(b, n), np.repeat(u, n)
    times = (b + rng.random(len(b))) * BIN_S
    order = np.argsort(times, kind='stable')
    return u[order].astype(np.uint16), times[order]


def shd_samples(n_train: int, n_test: int, seed: int = 0, **kw):
    """{'train': [(label, units, times_s, speaker), ...], 'test': [...]}: train from TRAIN_SPEAKERS,
    test from TEST_SPEAKERS, labels balanced."""
    syllables, words = syllable_inventory(), word_templates()
    rng = np.random.default_rng([seed, 2])
    out = {}
    for split, n, speakers in (('train', n_train, TRAIN_SPEAKERS), ('test', n_test, TEST_SPEAKERS)):
        labels = rng.permutation(np.arange(n) % N_WORDS)
        spk = rng.choice(speakers, n)
        out[split] = [(int(lab), *utterance(int(lab), int(s), rng, syllables=syllables, words=words, **kw), int(s))
                      for lab, s in zip(labels, spk)]
    return out


def shd_stats(samples) -> dict:
    rows = samples['train'] + samples['test']
    n = np.array([len(r[1]) for r in rows])
    dur = np.array([r[2][-1] - r[2][0] for r in rows])
    return dict(spikes_mean=float(n.mean()), spikes_std=float(n.std()), duration_s_mean=float(dur.mean()),
                duration_s_min=float(dur.min()), duration_s_max=float(dur.max()),
                train_speakers=sorted({r[3] for r in samples['train']}),
                test_speakers=sorted({r[3] for r in samples['test']}))


def shd_features(rows, n_time: int = 0, group: int = 10) -> np.ndarray:
    """Spike counts per group of `group` channels; n_time > 0: also per n_time bins of each sample's own
    first-to-last span (as ToFrame bins it), else time-collapsed."""
    G = N_CHANNELS // group
    X = np.zeros((len(rows), max(n_time, 1) * G), np.float32)
    for i, (_, u, t, _) in enumerate(rows):
        c = np.asarray(u, np.int64) // group
        if n_time:
            span = max(t[-1] - t[0], 1e-9)
            k = np.minimum(((t - t[0]) / span * n_time).astype(np.int64), n_time - 1)
            c = k * G + c
        np.add.at(X[i], c, 1)
    return X


def shd_baselines(samples) -> dict:
    ytr = np.array([r[0] for r in samples['train']])
    yte = np.array([r[0] for r in samples['test']])
    out = {}
    for name, kw in (('logistic_channel_counts', dict(n_time=0, group=1)),
                     ('logistic_time_resolved', dict(n_time=10, group=10))):
        out[name] = logistic_accuracy(shd_features(samples['train'], **kw), ytr,
                                      shd_features(samples['test'], **kw), yte)
    out['chance'] = 1 / N_WORDS
    return out


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def logistic_accuracy(Xtr, ytr, Xte, yte, C: float = 0.05) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    f = lambda X: np.log1p(X)  # noqa: E731
    sc = StandardScaler().fit(f(Xtr))
    clf = LogisticRegression(C=C, max_iter=300).fit(sc.transform(f(Xtr)), ytr)
    return float(clf.score(sc.transform(f(Xte)), yte))


def single_feature_accuracy(Xtr, ytr, Xte, yte, n_classes: int, max_value: int = 15) -> float:
    """The best single-feature rule on the training set (each clipped count value -> its majority class),
    scored on the test set."""
    A = np.clip(Xtr, 0, max_value).astype(np.int64)
    B = np.clip(Xte, 0, max_value).astype(np.int64)
    best, best_j, best_table = -1., 0, None
    for j in range(A.shape[1]):
        table = np.zeros((max_value + 1, n_classes))
        np.add.at(table, (A[:, j], ytr), 1)
        acc = table.max(1).sum() / len(ytr)
        if acc > best:
            best, best_j, best_table = acc, j, table.argmax(1)
    return float((best_table[B[:, best_j]] == yte).mean())


def nmnist_baselines(samples) -> dict:
    Xtr, Xte = nmnist_features(samples['train']), nmnist_features(samples['test'])
    ytr = np.array([r[0] for r in samples['train']])
    yte = np.array([r[0] for r in samples['test']])
    return dict(logistic_first_saccade=logistic_accuracy(Xtr, ytr, Xte, yte),
                single_pixel=single_feature_accuracy(Xtr, ytr, Xte, yte, 10), chance=0.1)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


# The official on-disk formats (rsnn/event_files.py; re-exported here for tests/fake_data.py).
from rsnn.event_files import (encode_nmnist_events, write_marker, write_nmnist_files,  # noqa: E402,F401
                              write_shd_files, zip_folder)


def write_nmnist(out: str, samples, params: dict) -> str:
    root = write_nmnist_files(out, samples, zip_folders=False)
    write_marker(root, dict(generator='scripts/synthetic_events.py', dataset='nmnist',
                            n_train=len(samples['train']), n_test=len(samples['test']), **params))
    return root


def write_shd(out: str, samples, params: dict) -> str:
    root = write_shd_files(out, samples)
    write_marker(root, dict(generator='scripts/synthetic_events.py', dataset='shd',
                            n_train=len(samples['train']), n_test=len(samples['test']), **params))
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dataset', choices=('nmnist', 'shd'), required=True, help='which recordings to imitate')
    p.add_argument('--out', required=True, help='data folder; NMNIST/ or SHD/ is written inside it')
    p.add_argument('--n_train', type=int, default=6000, help='training samples to write')
    p.add_argument('--n_test', type=int, default=1000, help='test samples to write')
    p.add_argument('--seed', type=int, default=0, help='seed of the train / test split and the samples (SHD words and speakers are fixed)')
    p.add_argument('--no_baselines', action='store_true', help='skip the classifier baselines')
    args = p.parse_args(argv)
    t0 = time.time()
    params = dict(seed=args.seed)
    gen, write, stat, base_fn = ((nmnist_recordings, write_nmnist, nmnist_stats, nmnist_baselines)
                                 if args.dataset == 'nmnist' else (shd_samples, write_shd, shd_stats, shd_baselines))
    samples = gen(args.n_train, args.n_test, args.seed)
    t1 = time.time()
    root = write(args.out, samples, params)
    t2 = time.time()
    stats = stat(samples)
    print(f'wrote {root}: {args.n_train} train / {args.n_test} test recordings (generated in {t1 - t0:.1f} s, '
          f'written in {t2 - t1:.1f} s)', flush=True)
    print('stats:', {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()})
    if not args.no_baselines and args.n_train and args.n_test:
        base = base_fn(samples)
        print('baselines (test accuracy):', {k: round(v, 3) for k, v in base.items()})
    return 0


if __name__ == '__main__':
    sys.exit(main())
