"""N-MNIST and SHD as tonic reads them: what each dataset is (sizes, files, where to get them), tonic's
existence check without a download, and opening tonic's dataset with a one-line error when the files are
absent or unreadable. The framing, the frame cache and the loaders are in event_data.py.
"""
from __future__ import annotations

import dataclasses
import os


from rsnn import datasets, tonic_adapter
from rsnn.errors import UserError


@dataclasses.dataclass(frozen=True)
class EventDataset:
    key: str                 # --dataset value (its row of datasets.DATASETS gives the title and the sizes)
    tonic_class: str         # class name in tonic.datasets (also the folder tonic uses under --data_dir)
    sensor_size: tuple       # tonic's (x, y, p); its product is the row's n_in
    train_files: tuple       # what tonic needs on disk, relative to <data_dir>/<tonic_class>/
    test_files: tuple
    urls: tuple              # (file name, official download address)
    homepage: str
    size: str                # download size, for the message

    @property
    def row(self) -> datasets.Dataset:
        return datasets.DATASETS[self.key]

    @property
    def title(self) -> str:
        return self.row.title

    @property
    def n_in(self) -> int:
        return self.row.n_in

    @property
    def n_classes(self) -> int:
        return self.row.n_out


EVENT_DATASETS = {
    'nmnist': EventDataset(
        key='nmnist', tonic_class='NMNIST', sensor_size=(34, 34, 2),
        train_files=('train.zip', 'Train/<digit>/*.bin (at least 10000 files; 60000 in the release)'),
        test_files=('test.zip', 'Test/<digit>/*.bin (10000 files)'),
        urls=(('train.zip', 'https://data.mendeley.com/public-files/datasets/468j46mzdv/files/'
                            '39c25547-014b-4137-a934-9d29fa53c7a0/file_downloaded'),
              ('test.zip', 'https://data.mendeley.com/public-files/datasets/468j46mzdv/files/'
                           '05a4d654-7e03-4c15-bdfa-9bb2bcbea494/file_downloaded')),
        homepage='https://www.garrickorchard.com/datasets/n-mnist (https://data.mendeley.com/datasets/468j46mzdv/1)',
        size='about 1.1 GB'),
    'shd': EventDataset(
        key='shd', tonic_class='SHD', sensor_size=(700, 1, 1),
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


# scripts/synthetic_events.py writes this file into the NMNIST/ (SHD/) folder it generates.
SYNTHETIC_MARKER = 'SYNTHETIC.json'


def is_synthetic(location: str) -> bool:
    return os.path.isfile(os.path.join(location, SYNTHETIC_MARKER))


def tonic_files_present(info: EventDataset, data_dir: str, train: bool) -> bool:
    """tonic's own existence check (the one its constructor runs), without constructing the class
    (rsnn/tonic_adapter.py: the one place that touches tonic's private names)."""
    import tonic.datasets
    cls = getattr(tonic.datasets, info.tonic_class)
    location = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), cls.__name__)
    return tonic_adapter.files_present(cls, location, train, relaxed=cls.__name__ == 'NMNIST' and is_synthetic(location))


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
            with tonic_adapter.relaxed_nmnist_check(cls):
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
    if info.tonic_class == 'SHD':
        h5, archive = (os.path.join(location, f) for f in (info.train_files if train else info.test_files))
        if os.path.isfile(h5) and not os.path.exists(archive):
            raise UserError(f'{h5} is there but not {os.path.basename(archive)} beside it, which tonic\'s existence '
                            f'check also requires (it reads only the .h5): put the downloaded archive back, or '
                            f'create an empty one: touch {archive}')
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
