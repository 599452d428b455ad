"""N-MNIST and SHD: tonic's readers, ToFrame, and a disk cache of the framed data, batched time-major
(T, B, n_in) through torch DataLoaders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import numpy as np

from datasets import worker_loader
from utils import UserError

# The events are read by tonic's own classes (`tonic.datasets.NMNIST(first_saccade_only=True)`,
# `tonic.datasets.SHD`) and framed by `tonic.transforms.ToFrame(sensor_size, n_time_bins=T)`. Framing
# the whole split once is the slow part, so its result is kept on disk, sparse (the frames are mostly
# zeros), in a folder whose name holds a hash of everything that determines it (dataset, split, T,
# sensor size, first-saccade cut, tonic version, the list of source files). A later epoch or run reads
# the cache through np.memmap and rebuilds dense float32 frames per batch, time-major (T, B, n_in).


CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class EventDataset:
    key: str                 # --dataset value
    title: str
    tonic_class: str         # class name in tonic.datasets (also the folder tonic uses under --data_dir)
    sensor_size: tuple       # tonic's (x, y, p)
    n_classes: int
    train_files: tuple       # what tonic needs on disk, relative to <data_dir>/<tonic_class>/
    test_files: tuple
    urls: tuple              # (file name, official download address)
    homepage: str
    size: str                # download size, for the message

    @property
    def n_in(self) -> int:
        return int(np.prod(self.sensor_size))


EVENT_DATASETS = {
    'nmnist': EventDataset(
        key='nmnist', title='N-MNIST', tonic_class='NMNIST', sensor_size=(34, 34, 2), n_classes=10,
        train_files=('train.zip', 'Train/<digit>/*.bin (at least 10000 files; 60000 in the release)'),
        test_files=('test.zip', 'Test/<digit>/*.bin (10000 files)'),
        urls=(('train.zip', 'https://data.mendeley.com/public-files/datasets/468j46mzdv/files/'
                            '39c25547-014b-4137-a934-9d29fa53c7a0/file_downloaded'),
              ('test.zip', 'https://data.mendeley.com/public-files/datasets/468j46mzdv/files/'
                           '05a4d654-7e03-4c15-bdfa-9bb2bcbea494/file_downloaded')),
        homepage='https://www.garrickorchard.com/datasets/n-mnist (https://data.mendeley.com/datasets/468j46mzdv/1)',
        size='about 1.1 GB'),
    'shd': EventDataset(
        key='shd', title='SHD', tonic_class='SHD', sensor_size=(700, 1, 1),
        n_classes=20,
        train_files=('shd_train.h5', 'shd_train.h5.zip'),
        test_files=('shd_test.h5', 'shd_test.h5.zip'),
        urls=(('shd_train.h5.zip', 'https://zenkelab.org/datasets/shd_train.h5.zip'),
              ('shd_test.h5.zip', 'https://zenkelab.org/datasets/shd_test.h5.zip')),
        homepage='https://zenkelab.org/resources/spiking-heidelberg-datasets-shd/',
        size='about 0.4 GB'),
}


def event_dataset(name: str) -> EventDataset:
    if name not in EVENT_DATASETS:
        raise ValueError(f'unknown dataset {name!r}; choose one of {sorted(EVENT_DATASETS)}')
    return EVENT_DATASETS[name]


def _tonic_probe(cls, location: str, train: bool):
    """An instance of tonic's class with only the attributes its `_check_exists` reads (its constructor
    would start a download when the check fails)."""
    probe = cls.__new__(cls)
    probe.location_on_system = location
    if cls.__name__ == 'NMNIST':
        probe.filename = cls.train_filename if train else cls.test_filename
        probe.folder_name = cls.train_folder if train else cls.test_folder
    else:
        probe.filename = cls.train_zip if train else cls.test_zip
        probe.folder_name = ''
        probe.data_filename = probe.filename[:-4]
    return probe


# scripts/synthetic_events.py writes this file into the NMNIST/ (SHD/) folder it generates.
SYNTHETIC_MARKER = 'SYNTHETIC.json'


def is_synthetic(location: str) -> bool:
    return os.path.isfile(os.path.join(location, SYNTHETIC_MARKER))


class _relaxed_nmnist_check:
    """While active, tonic's NMNIST existence check asks for one .bin file per split instead of 10000:
    used only for a folder that holds SYNTHETIC_MARKER. The dataset object stays a plain tonic NMNIST
    (a subclass made on the fly could not be pickled into spawned loader workers)."""

    def __init__(self, cls):
        self.cls = cls

    def __enter__(self):
        def _check_exists(ds):
            return ds._is_file_present() and ds._folder_contains_at_least_n_files_of_type(1, '.bin')
        self.original = self.cls.__dict__.get('_check_exists')
        self.cls._check_exists = _check_exists
        return self.cls

    def __exit__(self, *exc):
        if self.original is None:
            del self.cls._check_exists
        else:
            self.cls._check_exists = self.original


def tonic_files_present(info: EventDataset, data_dir: str, train: bool) -> bool:
    """tonic's own existence check (the one its constructor runs), without constructing the class."""
    import tonic.datasets
    cls = getattr(tonic.datasets, info.tonic_class)
    location = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), cls.__name__)
    probe = _tonic_probe(cls, location, train)
    if cls.__name__ == 'NMNIST' and is_synthetic(location):
        with _relaxed_nmnist_check(cls):
            ok = bool(probe._check_exists())
    else:
        ok = bool(probe._check_exists())
    if ok and hasattr(probe, 'data_filename'):
        ok = os.path.isfile(os.path.join(location, probe.data_filename))
    return ok


def missing_data_message(info: EventDataset, data_dir: str, train: bool, reason: str) -> str:
    location = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), info.tonic_class)
    split = 'train' if train else 'test'
    files = '; '.join(f'{split} split: ' + ' + '.join(fs) for split, fs in
                      (('train', info.train_files), ('test', info.test_files)))
    urls = ', '.join(f'{name} from {url}' for name, url in info.urls)
    return (f'{info.title} ({split} split) not found in {location} and it could not be downloaded '
            f'({reason}). Expected there: {files}. Get {urls} (official page: {info.homepage}), '
            f'unzip them in {location} keeping the .zip files, or point --data_dir at the folder that '
            f'holds {info.tonic_class}/.')


def _missing_ancestors(path: str) -> list:
    """The folders from `path` up that do not exist yet (deepest first)."""
    out = []
    while path and not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _snapshot(location: str) -> set:
    found = set()
    if os.path.isdir(location):
        for root, dirs, files in os.walk(location):
            found.update(os.path.join(root, n) for n in dirs + files)
    return found


def _remove_new(location: str, before: set, created: list):
    """Remove what a failed download left: paths under `location` that were not there before, then the
    folders that did not exist (only if empty)."""
    if os.path.isdir(location):
        for root, dirs, files in os.walk(location, topdown=False):
            for n in files:
                p = os.path.join(root, n)
                if p not in before:
                    os.remove(p)
            for n in dirs:
                p = os.path.join(root, n)
                if p not in before and not os.listdir(p):
                    os.rmdir(p)
    for p in created:  # deepest first
        if os.path.isdir(p) and not os.listdir(p):
            os.rmdir(p)


def open_tonic_dataset(info: EventDataset, data_dir: str, train: bool, transform=None):
    """tonic's NMNIST (first saccade) or SHD (`info`, from event_dataset) on `data_dir`.

    When the files are absent, tonic's constructor downloads them (online). If that fails, whatever it
    created is removed and a UserError says where the files were expected and where to get them.
    """
    import tonic.datasets
    cls = getattr(tonic.datasets, info.tonic_class)
    root = os.path.abspath(os.path.expanduser(data_dir))
    location = os.path.join(root, cls.__name__)
    kwargs = dict(first_saccade_only=True) if info.tonic_class == 'NMNIST' else {}
    if tonic_files_present(info, root, train):
        if info.tonic_class == 'NMNIST' and is_synthetic(location):
            # a synthetic set (scripts/synthetic_events.py) may hold fewer than tonic's 10000 files
            print(f'{location} holds a synthetic N-MNIST ({SYNTHETIC_MARKER}): tonic\'s 10000-file check '
                  f'relaxed to one .bin file per split', flush=True)
            with _relaxed_nmnist_check(cls):
                try:
                    return cls(root, train=train, transform=transform, **kwargs)
                except (OSError, KeyError, ValueError) as e:
                    raise UserError(f'{info.title} in {location} could not be read ({type(e).__name__}: '
                                      f'{e}); regenerate it with scripts/synthetic_events.py')
        try:
            return cls(root, train=train, transform=transform, **kwargs)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f'{info.title} in {location} could not be read ({type(e).__name__}: {e}); '
                              f'replace the files with the official ones ({info.homepage})')
    created = _missing_ancestors(location)
    before = _snapshot(location)
    print(f'{info.title} ({"train" if train else "test"}) not found in {location}: trying to download it '
          f'({info.size})', flush=True)
    try:
        ds = cls(root, train=train, transform=transform, **kwargs)
        if not tonic_files_present(info, root, train):
            raise RuntimeError('the downloaded archive did not hold the expected files')
        return ds
    except Exception as e:
        _remove_new(location, before, created)
        reason = f'{type(e).__name__}: {e}'.replace('\n', ' ')
        raise UserError(missing_data_message(info, root, train, reason)) from None
    except BaseException:
        _remove_new(location, before, created)
        raise


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
        if len(events) == 0:
            return np.zeros(0, self.index_dtype), np.zeros(0, np.int16)
        frames = np.asarray(self.to_frame(events))        # (T, p, y, x) int16 counts
        flat = frames.reshape(-1)
        idx = np.flatnonzero(flat)
        return idx.astype(self.index_dtype), flat[idx].astype(np.int16)


def _identity(x):
    return x


def _source_fingerprint(ds) -> str:
    """What identifies the source files: their relative paths (N-MNIST) or the HDF5 file's size and
    modification time (SHD), and the number of samples."""
    h = hashlib.sha256()
    loc = ds.location_on_system
    if getattr(ds, 'data', None):
        for p in ds.data:
            h.update(os.path.relpath(p, loc).encode())
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


def densify(pos, cnt, labels, shape):
    """A sparse batch (see FramedSplit.sparse_batch) -> float32 (T, B, n_in), int32 labels."""
    pos, cnt, labels = np.asarray(pos), np.asarray(cnt), np.asarray(labels)
    shape = tuple(int(n) for n in shape)
    xs = np.zeros(int(np.prod(shape)), np.float32)  # calloc: untouched pages cost nothing
    xs[pos] = cnt
    return xs.reshape(shape), labels


def build_frame_cache(ds, transform: FrameToSparse, folder: str, n_workers: int = 0, desc: str = '',
                      progress: bool = True):
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
            for (idx, cnt), label in tqdm(loader, total=len(ds), desc=desc, leave=False, dynamic_ncols=True,
                                     disable=not progress):
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
    """The framed split of `info` (from event_dataset) from the cache, framing it (tonic ToFrame) on first use."""
    if n_time_bins < 1:
        raise UserError(f'--data_length must be >= 1, got {n_time_bins}')
    transform = FrameToSparse(info.sensor_size, n_time_bins)
    if ds is None:
        ds = open_tonic_dataset(info, data_dir, train, transform=transform)
    else:
        ds.transform = transform
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or os.path.join(data_dir, 'cache')))
    key, params = frame_cache_key(info, train, n_time_bins, ds)
    folder = os.path.join(cache_dir, key)
    if not os.path.isfile(os.path.join(folder, 'meta.json')):
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f'cannot create the frame cache folder {cache_dir} ({e}); choose a writable '
                              f'--cache_dir')
        with _FileLock(os.path.join(cache_dir, key + '.lock')):
            if not os.path.isfile(os.path.join(folder, 'meta.json')):
                t0 = time.time()
                split = 'train' if train else 'test'
                print(f'framing {info.title} {split} ({len(ds)} samples, {n_time_bins} bins) into {folder} '
                      f'(once; later runs read the cache)', flush=True)
                tmp = build_frame_cache(ds, transform, folder, n_workers, desc=f'framing {info.key} {split}',
                                         progress=progress)
                meta = dict(params, n_time_bins=int(n_time_bins), n_in=info.n_in, n_samples=len(ds),
                            index_dtype=np.dtype(transform.index_dtype).name,
                            seconds_to_build=round(time.time() - t0, 2))
                with open(os.path.join(tmp, 'meta.json'), 'w') as f:
                    json.dump(meta, f, indent=2)
                shutil.rmtree(folder, ignore_errors=True)  # an incomplete one (no meta.json): we hold the lock
                os.replace(tmp, folder)
    return FramedSplit(folder)


class EpochBatchSampler:
    """Index batches of one epoch; set `.epoch` before iterating. Shuffled with a permutation seeded by
    (seed, epoch), so a resumed run sees the batches of an uninterrupted one; `max_batches` caps an
    epoch (quick runs). A last short batch is kept unless drop_last."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 max_batches: int = None):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.max_batches, self.epoch = seed, max_batches, 0

    def __len__(self):
        full, rest = divmod(self.n, self.batch_size)
        n = full + (1 if rest and not self.drop_last else 0)
        return min(n, self.max_batches) if self.max_batches else n

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        else:
            order = np.arange(self.n)
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


class FrameBatches:
    """Map-style dataset for a DataLoader with batch_size=None: an index array -> one sparse batch.

    Workers send the sparse batch (about 1 MB for N-MNIST at B = 128) and the main process densifies it
    (DenseBatches): a dense 473 MB batch (T = 400) through the workers' shared memory took 0.6 s here,
    densifying in the main process 0.05-0.1 s."""

    def __init__(self, split: FramedSplit):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, indices):
        return self.split.sparse_batch(indices)


class _Failed:
    def __init__(self, error):
        self.error = error


_END = object()


class DenseBatches:
    """Iterate a DataLoader of sparse batches as numpy (xs float32 (T, B, n_in), labels int32); keeps len().

    A background thread densifies the next batch while the current one trains (jax releases the GIL
    while it computes): the dense array is what costs (473 MB of fresh pages per N-MNIST batch at
    T = 400, B = 128), the sparse batch is small. `prefetch` batches wait at most (0: no thread)."""

    def __init__(self, loader, prefetch: int = 1):
        self.loader, self.prefetch = loader, prefetch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.prefetch <= 0:
            for item in self.loader:
                yield densify(*item)
            return
        import queue
        import threading
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for item in self.loader:
                    if not put(densify(*item)):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer
                put(_Failed(e))

        thread = threading.Thread(target=produce, name='densify-batches', daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()          # a consumer that stops early: let the producer finish its batch and quit
            thread.join()


def event_loaders(train_split: FramedSplit, test_split: FramedSplit, *, batch_size: int, seed: int,
                  n_workers: int = 0, drop_last: bool = False, batches_per_epoch: int = None,
                  eval_batches: int = None):
    """train_batches(epoch) and test_batches() for train_loop.fit, each an iterable of numpy
    (xs float32 (T, B, n_in), labels int32 (B,)), loaded by `n_workers` spawned workers.

    Training batches are a permutation seeded by (seed, epoch), at most `batches_per_epoch` of them;
    the test batches a fixed permutation, at most `eval_batches`."""
    train_sampler = EpochBatchSampler(len(train_split), batch_size, shuffle=True,
                                      drop_last=bool(drop_last), seed=seed, max_batches=batches_per_epoch)
    # The test order is a fixed permutation: --eval_batches then evaluates a random, fixed subset
    # (tonic lists N-MNIST sorted by digit).
    test_sampler = EpochBatchSampler(len(test_split), batch_size, shuffle=True, drop_last=False,
                                     seed=seed, max_batches=eval_batches)
    if len(train_sampler) == 0:
        raise UserError(f'the training split has {len(train_split)} samples: no full batch of '
                          f'{batch_size} (drop --drop_last or lower --batch_size)')
    train_loader = worker_loader(FrameBatches(train_split), n_workers, batch_size=None,
                                 sampler=train_sampler)
    test_loader = worker_loader(FrameBatches(test_split), n_workers, batch_size=None,
                                sampler=test_sampler)

    def train_batches(epoch: int):
        train_sampler.epoch = epoch
        return DenseBatches(train_loader)

    def test_batches():
        return DenseBatches(test_loader)

    return train_batches, test_batches
