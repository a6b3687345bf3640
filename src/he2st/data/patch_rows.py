"""Spot patches read from their HDF5 caches on demand, so end-to-end training holds one batch, not a study.

A :class:`PatchRows` is a list of (cache file, row in that file) pairs with the shape of the patches
behind them. Indexing it (index array, boolean mask, slice) gives another :class:`PatchRows` over the
same files, so subsetting and concatenating spot sets read nothing; :meth:`PatchRows.read` (and
``np.asarray``) reads the rows asked for, grouped by file and sorted (:mod:`he2st.data.patch_reader`),
and returns them in the order asked for. Files are opened on first read and kept open per process;
a pickled copy (a spawned worker) or a forked child opens its own.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from he2st.data.patch_reader import PatchFileReader
from he2st.errors import He2stError


class _Handles:
    """The open caches of one family of :class:`PatchRows` views, owned by one process."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # threads training on one spot set open each file once
        self._files: dict[Path, PatchFileReader] = {}
        weakref.finalize(self, _close_all, self._files)

    def reader(self, path: Path, n_rows: int) -> PatchFileReader:
        """The open cache ``path``, refused when it holds other than the ``n_rows`` it had when listed."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's open files are not its own to use
                self._files, self._pid = {}, os.getpid()
                weakref.finalize(self, _close_all, self._files)
            if path not in self._files:
                self._files[path] = PatchFileReader(path, n_rows)
            return self._files[path]

    def close(self) -> None:
        with self._lock:
            _close_all(self._files)


def _close_all(files: dict[Path, PatchFileReader]) -> None:
    for reader in files.values():
        reader.close()
    files.clear()


class PatchRows:
    """Rows of patch caches, read when asked for: ``files[which[i]]``'s row ``rows[i]`` is patch ``i``."""

    dtype = np.dtype(np.uint8)

    def __init__(self, files: Sequence[Path], lengths: Sequence[int], which: np.ndarray, rows: np.ndarray,
                 patch_shape: tuple[int, ...], handles: _Handles | None = None) -> None:
        self.files = tuple(Path(f) for f in files)
        self.lengths = tuple(int(n) for n in lengths)  # rows of each file when listed (checked when read)
        self.which = np.asarray(which, dtype=np.int32)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self._handles = handles if handles is not None else _Handles()

    @classmethod
    def from_cache(cls, path: str | Path) -> PatchRows:
        """Every patch of one cache file (``img`` N x H x W x 3 uint8), in file order; reads only its header."""
        path = Path(path)
        try:
            with h5py.File(path, "r") as fh:
                shape, dtype = fh["img"].shape, fh["img"].dtype
        except (OSError, KeyError) as exc:
            raise He2stError(f"not a readable he2st patch cache ({type(exc).__name__}: {exc})", path) from exc
        if dtype != np.uint8 or len(shape) != 4:
            raise He2stError(f"patch cache holds {dtype} {shape[1:]} images, not uint8 (H, W, 3)", path)
        n = shape[0]
        return cls([path], [n], np.zeros(n, np.int32), np.arange(n), shape[1:])

    @staticmethod
    def concat(parts: Sequence[PatchRows]) -> PatchRows:
        """The rows of ``parts`` one after the other (still unread); all parts must hold patches of one shape."""
        if not parts:
            raise ValueError("nothing to concatenate")
        shapes = {p.patch_shape for p in parts}
        if len(shapes) > 1:
            raise He2stError(f"patches of different shapes cannot be stacked: {sorted(shapes)}")
        files: dict[tuple[Path, int], int] = {}
        which = []
        for p in parts:
            remap = np.array([files.setdefault((f, n), len(files)) for f, n in zip(p.files, p.lengths, strict=True)],
                             dtype=np.int32)
            which.append(remap[p.which])
        keys = list(files)
        return PatchRows([f for f, _ in keys], [n for _, n in keys], np.concatenate(which),
                         np.concatenate([p.rows for p in parts]), parts[0].patch_shape, parts[0]._handles)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.patch_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.patch_shape)

    def __getitem__(self, key) -> PatchRows | np.ndarray:
        """A view of the rows picked by an index array, boolean mask or slice; an integer reads that one patch."""
        picked = np.arange(len(self))[key]
        if picked.ndim == 0:
            return self.read(picked[None])[0]
        return PatchRows(self.files, self.lengths, self.which[picked], self.rows[picked], self.patch_shape,
                         self._handles)

    def read(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Patches ``idx`` (positions in this view; None: all) as uint8 ``(n, *patch_shape)``, reading only those."""
        which, rows = (self.which, self.rows) if idx is None else (self.which[idx], self.rows[idx])
        # the distinct (file, row) pairs, sorted by file then row: each file's share is one sorted run of rows
        wanted, inverse = np.unique(which.astype(np.int64) << 40 | rows, return_inverse=True)
        wanted_file, wanted_row = wanted >> 40, wanted & ((1 << 40) - 1)
        block = np.empty((len(wanted), *self.patch_shape), self.dtype)
        bounds = np.flatnonzero(np.diff(wanted_file)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(wanted)], strict=True):
            if b > a:
                f = int(wanted_file[a])
                self._handles.reader(self.files[f], self.lengths[f]).read(wanted_row[a:b], block[a:b])
        if np.array_equal(inverse, np.arange(len(inverse))):
            return block  # asked for in order, without repeats: no second copy
        return block[inverse]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        patches = self.read()
        return patches if dtype is None else patches.astype(dtype, copy=False)

    def close(self) -> None:
        """Close the files this view and the views sharing its handles opened (a later read reopens them)."""
        self._handles.close()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._handles = _Handles()


def take_patches(patches: np.ndarray | PatchRows, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of in-memory patches or of :class:`PatchRows`, as an in-memory uint8 array."""
    return patches.read(idx) if isinstance(patches, PatchRows) else patches[idx]
