"""Rows of one patch cache's ``img`` dataset, read at the cost of the bytes they hold.

HDF5 reads one row out of a chunk several times slower than reading the row's bytes (measured by
``benchmarks/finetune_memory.py``; figures in the scaling page), and fine-tuning reads scattered rows
every batch. Where the dataset's rows lie in the file as plain bytes -- uint8, no filter (compression,
shuffle), contiguous or chunked whole rows at a time, every chunk written: how ``he2st prepare`` writes
its caches -- a :class:`PatchFileReader` locates each chunk once through HDF5 and then reads rows from
the file directly; any other layout is read through HDF5.
"""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np

from he2st.errors import He2stError


class PatchFileReader:
    """An open patch cache: sorted, distinct rows of ``img`` read into a caller's array."""

    def __init__(self, path: Path, n_rows: int) -> None:
        self.path, self.n_rows = path, n_rows
        self._lock = threading.Lock()  # one file position shared by the threads that read through it
        self._h5: h5py.File | None = None
        self._raw = None
        try:
            fh = h5py.File(path, "r")
        except OSError as exc:
            raise He2stError(f"patch cache cannot be read ({exc})", path) from exc
        try:
            ds = fh["img"]
            if ds.shape[0] != n_rows:
                raise He2stError(f"patch cache holds {ds.shape[0]} patches, {n_rows} when its spots were loaded; "
                                 "load the spots again", path)
            self.row_bytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
            layout = _byte_layout(ds)
        except BaseException:
            fh.close()
            raise
        if layout is None:
            self._h5 = fh
            return
        self.chunk_rows, self.offsets = layout
        fh.close()
        self._raw = open(path, "rb", buffering=0)  # noqa: SIM115 -- kept open for reads, closed by close()

    @property
    def reads_bytes(self) -> bool:
        """Whether rows are read from the file's bytes (else through HDF5)."""
        return self._raw is not None

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows`` (sorted, distinct) into ``out`` (C-contiguous, one row each)."""
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_rows):
            raise He2stError(f"patch rows {rows[0]}..{rows[-1]} reach outside the cache's {self.n_rows}", self.path)
        try:
            if self._h5 is not None:
                _read_hdf5_runs(self._h5["img"], rows, out)
            else:
                self._read_bytes(rows, out)
        except OSError as exc:
            raise He2stError(f"patch cache cannot be read ({exc})", self.path) from exc

    def _read_bytes(self, rows: np.ndarray, out: np.ndarray) -> None:
        """One read per run of consecutive rows within a chunk, straight into ``out``."""
        chunk = rows // self.chunk_rows
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(chunk) != 0)) + 1
        with self._lock:
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
                offset = int(self.offsets[chunk[a]]) + int(rows[a] % self.chunk_rows) * self.row_bytes
                view = memoryview(out[a:b]).cast("B")
                self._raw.seek(offset)
                if self._raw.readinto(view) != len(view):
                    raise He2stError("patch cache ends before its last patch; run `he2st prepare` again", self.path)

    def close(self) -> None:
        """Close the file (reading again takes another reader)."""
        if self._h5 is not None:
            self._h5.close()
        if self._raw is not None:
            self._raw.close()


def _byte_layout(ds: h5py.Dataset) -> tuple[int, np.ndarray] | None:
    """``(rows per chunk, file offset of each chunk)`` where the rows are plain bytes in the file; else None."""
    plist = ds.id.get_create_plist()
    if ds.dtype != np.uint8 or plist.get_nfilters() or plist.get_external_count():
        return None
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()  # None until written
        return None if offset is None else (max(ds.shape[0], 1), np.array([offset], np.int64))
    if layout != h5py.h5d.CHUNKED or ds.chunks[1:] != ds.shape[1:]:
        return None
    rows = ds.chunks[0]
    offsets = np.full(-(-ds.shape[0] // rows), -1, np.int64)
    for i in range(ds.id.get_num_chunks()):
        info = ds.id.get_chunk_info(i)
        offsets[info.chunk_offset[0] // rows] = info.byte_offset
    return None if (offsets < 0).any() else (rows, offsets)  # an unwritten chunk reads as HDF5's fill value


def _read_hdf5_runs(ds: h5py.Dataset, rows: np.ndarray, out: np.ndarray) -> None:
    """Read sorted, distinct ``rows`` of ``ds`` into ``out`` through HDF5, one slice per run of consecutive rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
        ds.read_direct(out, np.s_[rows[start] : rows[stop - 1] + 1], np.s_[start:stop])
