"""Every use of tonic's private names, in one place: its existence check (`_check_exists`, and the helpers an
N-MNIST check calls) run on a bare instance, without the constructor (which would start a download), and the
relaxed N-MNIST check for a synthetic folder. rsnn/tonic_data.py calls files_present and relaxed_nmnist_check."""
from __future__ import annotations


def _probe(cls, location: str, train: bool):
    """An instance of tonic's class with only the attributes its `_check_exists` reads."""
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


class relaxed_nmnist_check:
    """While active, tonic's NMNIST existence check asks for one .bin file per split instead of 10000:
    used only for a folder that holds a synthetic set. The dataset object stays a plain tonic NMNIST
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


def files_present(cls, location: str, train: bool, relaxed: bool = False) -> bool:
    """tonic's own existence check of class `cls` (the one its constructor runs) on `location`, without
    constructing the class; `relaxed`: the one-file N-MNIST check (relaxed_nmnist_check). An SHD split also
    needs its .h5 beside the archive (tonic reads only the .h5)."""
    import os
    probe = _probe(cls, location, train)
    if relaxed:
        with relaxed_nmnist_check(cls):
            ok = bool(probe._check_exists())
    else:
        ok = bool(probe._check_exists())
    if ok and hasattr(probe, 'data_filename'):
        ok = os.path.isfile(os.path.join(location, probe.data_filename))
    return ok
