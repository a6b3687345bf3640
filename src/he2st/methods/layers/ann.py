"""Approximate nearest-neighbour search for big reference banks: a faiss IVF-Flat index with inner
product over L2-normalised embeddings (so its scores are cosine similarities).

IVF-Flat keeps the exact vectors, so the similarities it returns are the exact cosines of the
neighbours it finds; it can only miss a neighbour that lies in a list it did not probe (recall: see
``benchmarks/bank_scale.py``). It trains one k-means on a seeded sample and serialises to bytes that
the bank file stores, so a worker that loads a bank does not rebuild it. faiss is the optional extra
``he2st[ann]``; without it banks search exactly.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from he2st.errors import He2stError

__all__ = ["build", "faiss_module", "from_reader", "probes", "to_bytes"]

#: Inverted lists: about 4 sqrt(rows), faiss's guideline for IVF indexes.
LISTS_PER_SQRT_ROW = 4
#: Each query scans the nearest 1/64 of the lists, and at least 16 of them.
PROBE_DIVISOR = 64
MIN_PROBES = 16
#: Rows of the k-means training sample per list.
TRAIN_PER_LIST = 50
#: Rows added to the index at a time (bounds the copy made from a memory-mapped bank).
ADD_BLOCK_ROWS = 65_536


@functools.cache
def faiss_module() -> ModuleType | None:
    """The faiss module, or None: faiss is an optional extra (``he2st[ann]``)."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def _faiss() -> ModuleType:
    faiss = faiss_module()
    if faiss is None:
        raise He2stError("approximate search needs faiss: pip install 'he2st[ann]', or search exactly")
    return faiss


def probes(lists: int) -> int:
    """Lists each query scans."""
    return min(lists, max(MIN_PROBES, lists // PROBE_DIVISOR))


def build(embeddings: np.ndarray, seed: int = 0) -> Any:
    """An IVF-Flat index of the (L2-normalised) rows of ``embeddings``, k-means trained on a seeded sample."""
    faiss = _faiss()
    n, d = embeddings.shape
    lists = max(1, min(n, round(LISTS_PER_SQRT_ROW * math.sqrt(n))))
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_LIST * lists), replace=False))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # the sample is sized above; no warning for small banks
    index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    for start in range(0, n, ADD_BLOCK_ROWS):
        index.add(np.ascontiguousarray(embeddings[start : start + ADD_BLOCK_ROWS], dtype=np.float32))
    index.nprobe = probes(lists)
    return index


def to_bytes(index: Any) -> np.ndarray:
    """The index serialised (uint8), as the bank file stores it. Written through a Python callback rather
    than ``faiss.serialize_index``, whose conversion of faiss's byte vector to numpy fails intermittently
    (an assertion on the vector's class name) once other extension modules are loaded."""
    faiss = _faiss()
    parts: list[bytes] = []

    def write(chunk: bytes) -> int:
        parts.append(bytes(chunk))
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def from_reader(read: Callable[[int], bytes]) -> Any:
    """An index read piece by piece through ``read(nbytes)`` (no second copy of it in memory)."""
    faiss = _faiss()
    index = faiss.read_index(faiss.PyCallbackIOReader(read))  # returned as its own class, IndexIVFFlat
    index.nprobe = probes(index.nlist)
    return index
