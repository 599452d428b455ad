"""N-MNIST and SHD framed by tonic ToFrame, a disk cache of the framed data, batched time-major
(T, B, n_in) through torch DataLoaders; the datasets as tonic reads them are in tonic_data.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Optional

import numpy as np

from rsnn.datasets import worker_loader
# the datasets as tonic reads them (re-exported: event_data is where the scripts and tests find them)
from rsnn.tonic_data import (EVENT_DATASETS, SYNTHETIC_MARKER, EventDataset, event_dataset, is_synthetic,  # noqa: F401
                        missing_data_message, open_tonic_dataset, tonic_files_present)
from rsnn.errors import UserError
# the batches of the framed splits (re-exported: the scripts and tests find them here)
from rsnn.event_loaders import DenseBatches, EpochBatchSampler, FrameBatches, densify, event_loaders  # noqa: F401

# The events are read by tonic's own classes (`tonic.datasets.NMNIST(first_saccade_only=True)`,
# `tonic.datasets.SHD`) and framed by `tonic.transforms.ToFrame(sensor_size, n_time_bins=T)`. Framing
# the whole split once is the slow part, so its result is kept on disk, sparse (the frames are mostly
# zeros), in a folder whose name holds a hash of everything that determines it (dataset, split, T,
# sensor size, first-saccade cut, tonic version, the list of source files). A later epoch or run reads
# the cache through np.memmap and rebuilds dense float32 frames per batch, time-major (T, B, n_in).


CACHE_FORMAT = 2  # 2: recordings validated while framing (empty, times, coordinates), N-MNIST files keyed by size and mtime


class FrameToSparse:
    """tonic's ToFrame, then the nonzero entries of the (T, n_in) frame: flat indices t * n_in + i and
    their event counts. An event-less sample gives an empty frame (ToFrame itself would fail)."""

    def __init__(self, sensor_size, n_time_bins: int):
        import tonic.transforms
        self.sensor_size, self.n_time_bins = tuple(sensor_size), int(n_time_bins)
        self.n_in = int(np.prod(self.sensor_size))
        self.to_frame = tonic.transforms.ToFrame(sensor_size=self.sensor_size, n_time_bins=self.n_time_bins)
        self.index_dtype = np.int32 if self.n_time_bins * self.n_in < 2 ** 31 else np.int64

    def __call__(self, events):
        """A recording that would frame to something other than its events is refused (ValueError, named
        with its file by build_frame_cache): no events, times not finite or going backwards, an event off
        the sensor, or events that all vanish in framing."""
        if len(events) == 0:
            raise ValueError('the recording holds no events (an empty or cut file): it would train as a blank sample')
        self.check_times(events)
        self.check_coordinates(events)
        frames = np.asarray(self.to_frame(events))        # (T, p, y, x) int16 counts
        flat = frames.reshape(-1)
        idx = np.flatnonzero(flat)
        if len(idx) == 0:
            t = np.asarray(events['t'])
            raise ValueError(f'none of its {len(events)} events survives framing into {self.n_time_bins} bins (they '
                             f'span {int(t[-1] - t[0])} us; tonic ToFrame drops the last event and needs a span of at '
                             f'least {self.n_time_bins} us)')
        return idx.astype(self.index_dtype), flat[idx].astype(np.int16)

    @staticmethod
    def check_times(events):
        """Times finite, >= 0 and in order (ToFrame bins them from the first to the last: times out of order
        give an empty or wrong frame). A non-finite float time that tonic cast to int shows as negative."""
        if 't' not in (events.dtype.names or ()):
            return
        t = np.asarray(events['t'])
        if t.dtype.kind == 'f' and not np.all(np.isfinite(t)):
            raise ValueError(f'event {int(np.flatnonzero(~np.isfinite(t))[0])} has the time {t[~np.isfinite(t)][0]}')
        if np.any(t < 0):
            k = int(np.flatnonzero(t < 0)[0])
            raise ValueError(f'event {k} has a negative (or non-finite) time {t[k]}')
        back = np.flatnonzero(np.diff(t) < 0)
        if len(back):
            k = int(back[0]) + 1
            raise ValueError(f'the event times go backwards at event {k} ({t[k]} us after {t[k - 1]} us): tonic '
                             f'ToFrame needs them in order')


    def check_coordinates(self, events):
        """Every event on the sensor: x (N-MNIST pixel column, SHD unit) and y below the sensor's size, and
        the polarity where the sensor has two (SHD's single channel takes tonic's constant polarity)."""
        names = events.dtype.names or ()
        for field, size in (('x', self.sensor_size[0]), ('y', self.sensor_size[1]), ('p', self.sensor_size[2])):
            if field not in names or (field == 'p' and size == 1):
                continue
            values = events[field]
            bad = values[(values < 0) | (values >= size)]
            if len(bad):
                what = 'unit' if self.sensor_size[1:] == (1, 1) and field == 'x' else field
                raise ValueError(f'an event has {what} = {bad[0]}, outside the sensor\'s 0..{size - 1}')


def _identity(x):
    return x


def _source_fingerprint(ds) -> str:
    """What identifies the source files: their relative paths (N-MNIST) or the HDF5 file's size and
    modification time (SHD), and the number of samples."""
    h = hashlib.sha256()
    loc = ds.location_on_system
    if getattr(ds, 'data', None):
        for p in ds.data:  # each file's size and modification time: a file changed or restored is framed again
            st = os.stat(p)
            h.update(f'{os.path.relpath(p, loc)}:{st.st_size}:{st.st_mtime_ns}'.encode())
            h.update(b'\0')
    if hasattr(ds, 'data_filename'):
        st = os.stat(os.path.join(loc, ds.data_filename))
        h.update(f'{ds.data_filename}:{st.st_size}:{st.st_mtime_ns}'.encode())
    if is_synthetic(loc):  # a regenerated synthetic set reuses the file names: its marker tells them apart
        with open(os.path.join(loc, SYNTHETIC_MARKER), 'rb') as f:
            h.update(f.read())
    h.update(str(len(ds)).encode())
    return h.hexdigest()


def frame_cache_key(info: EventDataset, train: bool, n_time_bins: int, ds) -> tuple:
    import tonic
    name = info.key
    params = dict(format=CACHE_FORMAT, dataset=name, split='train' if train else 'test',
                  transform=f'ToFrame(sensor_size={tuple(info.sensor_size)}, n_time_bins={int(n_time_bins)})',
                  first_saccade_only=bool(getattr(ds, 'first_saccade_only', False)),
                  tonic=tonic.__version__, source=_source_fingerprint(ds))
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return f'{name}-{params["split"]}-T{int(n_time_bins)}-{digest}', params


class FramedSplit:
    """One split's framed data from the disk cache: sample i -> (float32 frame (T, n_in), label).

    Holds only the folder name until first use, so it pickles cheaply into DataLoader workers, each of
    which opens the arrays with np.memmap (read-only, shared through the page cache).
    """

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, 'meta.json')) as f:
            self.meta = json.load(f)
        self.n_time_bins, self.n_in = int(self.meta['n_time_bins']), int(self.meta['n_in'])
        self.labels = np.load(os.path.join(folder, 'labels.npy'))
        self._arrays = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_arrays'] = None
        return state

    def _open(self):
        if self._arrays is None:
            offsets = np.load(os.path.join(self.folder, 'offsets.npy'))
            n = int(offsets[-1])

            def mm(fname, dtype):
                if n == 0:
                    return np.zeros(0, dtype)
                return np.memmap(os.path.join(self.folder, fname), dtype=dtype, mode='r', shape=(n,))
            self._arrays = (offsets, mm('index.bin', self.meta['index_dtype']), mm('count.bin', 'int16'))
        return self._arrays

    def __len__(self):
        return len(self.labels)

    def n_events(self, i: int) -> int:
        """Events that ToFrame kept in sample i (the frame's sum)."""
        offsets, _, count = self._open()
        return int(count[offsets[i]:offsets[i + 1]].sum())

    def __getitem__(self, i: int):
        offsets, index, count = self._open()
        frame = np.zeros(self.n_time_bins * self.n_in, np.float32)
        sl = slice(offsets[i], offsets[i + 1])
        frame[index[sl]] = count[sl]
        return frame.reshape(self.n_time_bins, self.n_in), int(self.labels[i])

    def sparse_batch(self, indices):
        """The nonzero entries of the time-major batch (T, B, n_in) of the given samples: flat positions
        (t * B + b) * n_in + i, their counts, the int32 labels (B,) and the shape."""
        offsets, index, count = self._open()
        indices = np.asarray(indices, np.int64)
        B = len(indices)
        pos, cnt = [], []
        for b, i in enumerate(indices):
            sl = slice(offsets[i], offsets[i + 1])
            t, c = np.divmod(np.asarray(index[sl], np.int64), self.n_in)
            pos.append((t * B + b) * self.n_in + c)
            cnt.append(np.asarray(count[sl]))
        pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        cnt = np.concatenate(cnt) if cnt else np.zeros(0, np.int16)
        return pos, cnt, self.labels[indices].astype(np.int32), (self.n_time_bins, B, self.n_in)

    def batch(self, indices):
        """Dense time-major float32 frames (T, B, n_in) and int32 labels (B,) of the given samples."""
        return densify(*self.sparse_batch(indices))


def sample_source(ds, i: Optional[int] = None) -> str:
    """The file that holds sample i of tonic's dataset `ds` (an N-MNIST .bin, or SHD's HDF5 file)."""
    data = getattr(ds, 'data', None)
    if i is not None and isinstance(data, (list, tuple)) and i < len(data):
        return str(data[i])
    name = getattr(ds, 'data_filename', None)
    where = os.path.join(ds.location_on_system, name) if name else getattr(ds, 'location_on_system', '?')
    return where + (f' (sample {i})' if i is not None else '')


def error_text(e: BaseException) -> str:
    """One line of an exception, also of one re-raised from a DataLoader worker (whose message holds the
    worker's traceback: its last line is the error)."""
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    text = (lines[-1] if 'Traceback' in str(e) else lines[0]) if lines else ''
    return text if text.startswith(type(e).__name__) else f'{type(e).__name__}: {text}'


def build_frame_cache(ds, transform: FrameToSparse, folder: str, n_workers: int = 0, desc: str = '',
                      progress: bool = True, n_classes: Optional[int] = None):
    """Frame every sample of the tonic dataset `ds` (whose transform is `transform`) and write the cache
    folder atomically: into a temporary folder, renamed when complete."""
    from tqdm import tqdm
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = f'{folder}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        loader = worker_loader(ds, n_workers, batch_size=None, shuffle=False, collate_fn=_identity)
        offsets, labels = [0], []
        with open(os.path.join(tmp, 'index.bin'), 'wb') as fi, open(os.path.join(tmp, 'count.bin'), 'wb') as fc:
            samples = iter(tqdm(loader, total=len(ds), desc=desc, leave=False, dynamic_ncols=True,
                                disable=not progress))
            while True:
                try:  # the samples come in order: the i-th is sample len(labels)
                    (idx, cnt), label = next(samples)
                except StopIteration:
                    break
                except (IndexError, KeyError, ValueError, TypeError, OSError, EOFError) as e:
                    raise UserError(f'{sample_source(ds, len(labels))} cannot be read: {error_text(e)}; replace '
                                    f'the file (or the dataset) with an intact copy') from None
                if n_classes is not None and not 0 <= int(label) < n_classes:
                    raise UserError(f'{sample_source(ds, len(labels))}: label {int(label)} is outside the '
                                    f'{n_classes} classes 0..{n_classes - 1}; replace the file with an intact copy')
                fi.write(np.ascontiguousarray(idx, transform.index_dtype).tobytes())
                fc.write(np.ascontiguousarray(cnt, np.int16).tobytes())
                offsets.append(offsets[-1] + len(idx))
                labels.append(int(label))
        np.save(os.path.join(tmp, 'offsets.npy'), np.asarray(offsets, np.int64))
        np.save(os.path.join(tmp, 'labels.npy'), np.asarray(labels, np.int32))
        return tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _FileLock:
    """An exclusive lock on a file (fcntl), so that runs started together frame a split only once."""

    def __init__(self, path: str):
        self.path, self.f = path, None

    def __enter__(self):
        self.f = open(self.path, 'a')
        try:
            import fcntl
            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:  # not on POSIX: no lock, the atomic rename still keeps the cache whole
            pass
        return self

    def __exit__(self, *exc):
        self.f.close()


def load_framed_split(info: EventDataset, data_dir: str, train: bool, n_time_bins: int, cache_dir: str = None,
                      n_workers: int = 0, ds=None, progress: bool = True) -> FramedSplit:
    """The framed split of `info` (from event_dataset) from the cache, framing it (tonic ToFrame) on first use.
    A damaged cache (a file cut short, unreadable arrays) is rebuilt once, with a warning."""
    if n_time_bins < 1:
        raise UserError(f'--data_length must be >= 1, got {n_time_bins}')
    transform = FrameToSparse(info.sensor_size, n_time_bins)
    if ds is None:
        ds = open_tonic_dataset(info, data_dir, train, transform=transform)
    else:
        ds.transform = transform
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or os.path.join(data_dir, 'cache')))
    try:
        check_label_lengths(ds)
        key, params = frame_cache_key(info, train, n_time_bins, ds)
    except (IndexError, KeyError, ValueError, TypeError, OSError) as e:  # e.g. an HDF5 file without labels
        raise UserError(f'{sample_source(ds)} cannot be read: {error_text(e)}; replace it with an intact copy')
    folder = os.path.join(cache_dir, key)
    for path in (cache_dir, folder):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f'{path} is a file where the frame cache keeps a folder; move it away or give another '
                            f'--cache_dir')
    if not os.path.isfile(os.path.join(folder, 'meta.json')):
        stale = older_cache(cache_dir, key, params)
        if stale:
            print(f'note: the {info.title} {params["split"]} files changed since the frame cache {stale} was built '
                  f'(sizes or modification times); framing them again into {folder}', flush=True)
    for attempt in range(2):
        if not os.path.isfile(os.path.join(folder, 'meta.json')):
            frame_split(info, ds, transform, train, n_time_bins, cache_dir, key, params, n_workers, progress)
        problem = cache_problem(folder, info)
        if problem is None:
            return FramedSplit(folder)
        if attempt:
            raise UserError(f'the frame cache {folder} is damaged again right after it was built ({problem}); '
                            f'check the disk, or give another --cache_dir')
        print(f'warning: the frame cache {folder} is damaged ({problem}); building it again', flush=True)
        with _FileLock(os.path.join(cache_dir, key + '.lock')):
            shutil.rmtree(folder, ignore_errors=True)  # this repository's own cache files


def check_label_lengths(ds):
    """An HDF5 file (SHD) whose labels are not as many as its spike trains: tonic counts the samples by the
    labels, so shorter labels would drop samples without a word (and longer ones fail at the end)."""
    name = getattr(ds, 'data_filename', None)
    if not name:
        return
    import h5py
    with h5py.File(os.path.join(ds.location_on_system, name), 'r') as f:
        n_labels, n_times, n_units = len(f['labels']), len(f['spikes/times']), len(f['spikes/units'])
    if not n_labels == n_times == n_units:
        raise ValueError(f'labels holds {n_labels} entries, spikes/times {n_times} and spikes/units {n_units}: '
                         f'every sample needs one label and one spike train (a damaged or edited file)')


def older_cache(cache_dir: str, key: str, params: dict) -> Optional[str]:
    """A frame-cache folder of the same dataset, split and framing whose source files were different (so
    the new one is built because files changed), or None."""
    prefix = key.rsplit('-', 1)[0] + '-'
    for name in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []:
        if not name.startswith(prefix) or name == key or '.' in name:
            continue
        try:
            with open(os.path.join(cache_dir, name, 'meta.json')) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        same = all(meta.get(k) == v for k, v in params.items() if k != 'source')
        if same and meta.get('source') != params['source']:
            return os.path.join(cache_dir, name)
    return None


def frame_split(info: EventDataset, ds, transform, train: bool, n_time_bins: int, cache_dir: str, key: str,
                params: dict, n_workers: int, progress: bool):
    """Frame a split into cache_dir/key (under a lock: runs started together frame it once)."""
    folder = os.path.join(cache_dir, key)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the frame cache folder {cache_dir} ({e}); choose a writable '
                          f'--cache_dir')
    with _FileLock(os.path.join(cache_dir, key + '.lock')):
        if os.path.isfile(os.path.join(folder, 'meta.json')):
            return
        t0 = time.time()
        split = 'train' if train else 'test'
        print(f'framing {info.title} {split} ({len(ds)} samples, {n_time_bins} bins) into {folder} '
              f'(once; later runs read the cache)', flush=True)
        tmp = build_frame_cache(ds, transform, folder, n_workers, desc=f'framing {info.key} {split}',
                                progress=progress, n_classes=info.n_classes)
        meta = dict(params, n_time_bins=int(n_time_bins), n_in=info.n_in, n_samples=len(ds),
                    index_dtype=np.dtype(transform.index_dtype).name,
                    seconds_to_build=round(time.time() - t0, 2))
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=2)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete one (no meta.json): we hold the lock
        os.replace(tmp, folder)


def cache_problem(folder: str, info: EventDataset) -> Optional[str]:
    """What is wrong with a frame-cache folder, or None: the sizes of index.bin and count.bin against the
    offsets, the number of labels, the label range."""
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
        offsets = np.load(os.path.join(folder, 'offsets.npy'))
        labels = np.load(os.path.join(folder, 'labels.npy'))
        n = int(offsets[-1])
        for name, dtype in (('index.bin', meta['index_dtype']), ('count.bin', 'int16')):
            size, expected = os.path.getsize(os.path.join(folder, name)), n * np.dtype(dtype).itemsize
            if size != expected:
                return f'{name} holds {size} bytes, {expected} expected'
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return error_text(e)
    if len(labels) != len(offsets) - 1 or len(labels) != meta.get('n_samples', len(labels)):
        return f'{len(labels)} labels for {len(offsets) - 1} samples'
    if np.any(np.diff(offsets) < 0):
        return 'offsets.npy is not increasing'
    if len(labels) and not (0 <= labels.min() and labels.max() < info.n_classes):
        return f'a label outside 0..{info.n_classes - 1}'
    return None
