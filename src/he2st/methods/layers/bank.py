"""BLEEP-style prediction by retrieval: find the k most similar reference spots, combine their profiles.

The reference bank holds the expression-side embeddings of training spots and their
measured expression. Because prediction only *looks up* profiles, the bank may carry more
genes than the model was trained on (e.g. the whole transcriptome), and the prediction is
always a combination of real spot profiles — BLEEP's argument for why it avoids the
over-smoothed, mean-reverting outputs of regression heads.

Big banks (a model trained on millions of spots) search approximately (:mod:`he2st.methods.layers.ann`)
and, loaded from a file, stay on disk: their matrices are memory-mapped and the rows a query batch
needs are read when it needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from he2st.errors import He2stError
from he2st.io import atomic_path
from he2st.methods.layers import ann

__all__ = ["ReferenceBank", "RetrievalResult"]

#: Above this many reference rows, ``search="auto"`` uses the approximate index (when faiss is installed).
APPROXIMATE_MIN_ROWS = 100_000
#: Arrays of a saved ``.h5`` bank at least this large are memory-mapped when it is loaded, not read:
#: rows are read when a query needs them, and workers on one machine share the pages.
MMAP_MIN_BYTES = 1 << 26
#: Upper bound on the elements of one query-chunk × bank-rows score block (64 MiB of float32),
#: so search memory does not grow with the number of queries.
MAX_BLOCK_ELEMENTS = 1 << 24
#: Elements of one query-chunk × k × genes block of gathered profiles (4 MiB of float32); the
#: gather is memory-bound, so small blocks that are averaged while still cached are fastest.
GATHER_BLOCK_ELEMENTS = 1 << 20
_FORMAT_VERSION = 1
_PAIR = "checkpoint_pair"  # the token of the checkpoint saved with the bank (an optional addition)
_WEIGHTINGS = ("average", "softmax", "similarity")
_SEARCHES = ("auto", "exact", "approximate")
_INDEX = "ivf_index"  # optional dataset of a .h5 bank: the serialised approximate index

ArrayLike = np.ndarray | torch.Tensor


def _as_2d_float32(x: ArrayLike, name: str) -> np.ndarray:
    """Convert a numpy array or (possibly grad-tracking, GPU) tensor to a C-contiguous float32 matrix.

    Avoids a copy when the input already is one (a bank may be gigabytes), except for read-only
    input (e.g. a memory map), which torch cannot wrap.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()  # also handles bf16/fp16 embeddings
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if not arr.flags.writeable:
        arr = arr.copy()
    if arr.ndim != 2:
        raise He2stError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    return arr


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero, so they match nothing strongly)."""
    return F.normalize(torch.from_numpy(x), dim=1).numpy()


@dataclass(frozen=True)
class RetrievalResult:
    """Output of :meth:`ReferenceBank.predict` for ``n`` query spots.

    ``expression``: ``(n, G)`` predicted profiles, columns in ``genes`` order.
    ``similarities``/``indices``: ``(n, k)`` cosine similarities and bank rows of the neighbours,
    best first. ``best_similarity``: ``(n,)`` similarity of the top match — low means the spot
    looks unlike anything in the reference (out-of-distribution). ``dispersion``: ``(n,)`` mean
    over genes of the (weighted) standard deviation of the k retrieved profiles — neighbours
    that disagree signal an uncertain prediction.
    """

    expression: np.ndarray
    similarities: np.ndarray
    indices: np.ndarray
    best_similarity: np.ndarray
    dispersion: np.ndarray
    genes: list[str]


class ReferenceBank:
    """Reference spots for retrieval: L2-normalised embeddings, their expression, gene names.

    ``embeddings`` ``(N, D)`` are normalised at construction so that inner products are cosine
    similarities. ``expression`` ``(N, G)`` may use a different (larger) gene list than the
    model's training panel. ``sample_ids`` optionally records which slide each row came from.
    ``normalize=False`` is only for embeddings already normalised (used by :meth:`load`, so a
    round trip is bit-exact). A float32 C-contiguous ``expression`` array is used without a
    copy, so the bank shares its memory.

    ``search`` is how :meth:`search` and :meth:`predict` find neighbours unless told otherwise:
    ``exact``, ``approximate`` (a faiss IVF-Flat index, :mod:`he2st.methods.layers.ann`) or ``auto``
    (approximate above :data:`APPROXIMATE_MIN_ROWS` rows when faiss is installed, else exact).
    """

    def __init__(
        self,
        embeddings: ArrayLike,
        expression: ArrayLike,
        genes: Sequence[str],
        sample_ids: Sequence[str] | None = None,
        *,
        normalize: bool = True,
        search: str = "auto",
    ) -> None:
        emb = _as_2d_float32(embeddings, "reference embeddings")
        expr = _as_2d_float32(expression, "reference expression")
        genes = [str(g) for g in genes]
        _check_shapes(emb, expr, genes, sample_ids)
        if not (np.isfinite(emb).all() and np.isfinite(expr).all()):
            raise He2stError("reference embeddings or expression contain NaN or infinite values")
        self._set(_l2_normalize(emb) if normalize else emb, expr, genes, sample_ids, search)

    def _set(self, embeddings: np.ndarray, expression: np.ndarray, genes: list[str],
             sample_ids: Sequence[str] | None, search: str) -> None:
        if search not in _SEARCHES:
            raise He2stError(f"unknown search {search!r}; use one of {', '.join(_SEARCHES)}")
        self.embeddings = embeddings
        self.expression = expression
        self.genes = genes
        self.sample_ids = None if sample_ids is None else [str(s) for s in sample_ids]
        self.default_search = search
        self._gene_index = {g: i for i, g in enumerate(genes)}
        self._index: Any = None  # the approximate index, built or read on first use
        self._stored_index: Path | None = None  # the .h5 file holding a serialised one
        self._per_sample: list[tuple[np.ndarray, ReferenceBank]] | None = None

    @classmethod
    def _trusted(cls, embeddings: np.ndarray, expression: np.ndarray, genes: list[str],
                 sample_ids: Sequence[str] | None, search: str) -> ReferenceBank:
        """A bank of arrays that already passed the checks (rows of a checked bank, or a bank file
        he2st wrote): no copy and no pass over the values, which may be gigabytes on disk."""
        bank = cls.__new__(cls)
        bank._set(embeddings, expression, genes, sample_ids, search)
        return bank

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.embeddings.shape[1]

    # ----------------------------------------------------------------- search
    def search(self, queries: ArrayLike, k: int, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine neighbours of each query: ``(scores, indices)``, both ``(n, k)``, best first.

        ``backend`` (default: the bank's ``search``): ``exact`` multiplies chunks of queries with the
        bank in torch (memory bounded by :data:`MAX_BLOCK_ELEMENTS`); ``approximate`` scans the
        nearest lists of an IVF-Flat index (the scores are exact cosines; a neighbour in an unprobed
        list can be missed; queries whose probed lists hold fewer than k rows are searched exactly);
        ``auto`` is approximate only when faiss is installed and the bank has more than
        :data:`APPROXIMATE_MIN_ROWS` rows.
        """
        q = self._prepare_queries(queries)
        if not 1 <= k <= len(self):
            raise He2stError(f"k={k} must be between 1 and the bank size {len(self)}")
        backend = backend or self.default_search
        if backend == "auto":
            backend = "approximate" if ann.faiss_module() is not None and len(self) > APPROXIMATE_MIN_ROWS else "exact"
        if backend == "exact":
            return self._search_exact(q, k)
        if backend == "approximate":
            return self._search_approximate(q, k)
        raise He2stError(f"unknown search backend {backend!r}; use one of {', '.join(_SEARCHES)}")

    def _prepare_queries(self, queries: ArrayLike) -> np.ndarray:
        q = _as_2d_float32(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise He2stError(f"query embeddings have dimension {q.shape[1]}, the bank has {self.dim}")
        return _l2_normalize(q)

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        bank = torch.from_numpy(self.embeddings)
        chunk = max(1, MAX_BLOCK_ELEMENTS // len(self))
        scores, indices = [], []
        for start in range(0, q.shape[0], chunk):
            top = torch.topk(torch.from_numpy(q[start : start + chunk]) @ bank.T, k, dim=1)
            scores.append(top.values.numpy())
            indices.append(top.indices.numpy())
        if not scores:  # no queries
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(indices)

    def _search_approximate(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, indices = self.approximate_index().search(q, k)
        indices = indices.astype(np.int64)
        short = (indices < 0).any(axis=1)  # fewer than k rows in the probed lists
        if short.any():
            scores[short], indices[short] = self._search_exact(q[short], k)
        return scores, indices

    def approximate_index(self) -> Any:
        """The faiss IVF-Flat index of the embeddings: read from the bank file when it stores one, else built."""
        if self._index is None:
            self._index = _read_index(self._stored_index) if self._stored_index else ann.build(self.embeddings)
            if (self._index.ntotal, self._index.d) != self.embeddings.shape:
                raise He2stError(f"the approximate index holds {self._index.ntotal} x {self._index.d} vectors, the "
                                 f"bank {len(self)} x {self.dim}", self._stored_index)
        return self._index

    # ---------------------------------------------------------------- predict
    def predict(
        self,
        queries: ArrayLike,
        k: int = 50,
        weighting: str = "average",
        temperature: float = 0.1,
        genes: Sequence[str] | None = None,
        backend: str | None = None,
        per_sample: bool = False,
    ) -> RetrievalResult:
        """Predict expression for image-side query embeddings from their k nearest reference spots.

        ``weighting``: ``"average"`` is BLEEP's plain mean of the k profiles; ``"softmax"``
        weights by ``softmax(similarity / temperature)`` so closer matches count more;
        ``"similarity"`` weights proportionally to ``max(similarity, 0)`` (uniform if all
        k similarities are ≤ 0). ``genes`` restricts/reorders the output columns; names
        missing from the bank raise :class:`He2stError` listing them. ``backend``: see :meth:`search`.

        ``per_sample``: each reference sample predicts from its own k nearest spots (all of them when
        it has fewer) and the samples' predictions are averaged with an equal say -- batch-balanced
        retrieval, as BBKNN balances neighbours across batches. A pooled top-k gathers in whichever
        slide looks most like the query's slide overall (stain, scanner, thickness), not in the spots
        that share its tissue, and carries that slide's expression level. Neighbours of all samples
        are returned, best first; a bank of one sample, or without ``sample_ids``, is searched pooled.
        The per-sample banks are built once; they share this bank's memory where each sample's rows
        are contiguous (as in banks built from training spots), else copy them. Each is searched on its
        own, so the approximate index serves only a sample above :data:`APPROXIMATE_MIN_ROWS` rows.
        """
        parts = self._sample_banks() if per_sample else []
        if len(parts) > 1:
            return _balanced([(rows, bank.predict(queries, min(k, len(bank)), weighting, temperature, genes, backend))
                              for rows, bank in parts])
        if weighting not in _WEIGHTINGS:
            raise He2stError(f"unknown weighting {weighting!r}; use one of {', '.join(_WEIGHTINGS)}")
        if weighting == "softmax" and temperature <= 0:
            raise He2stError(f"softmax temperature must be > 0, got {temperature}")
        columns = self._gene_columns(genes)
        scores, indices = self.search(queries, k, backend)
        weights = _neighbour_weights(torch.from_numpy(scores), weighting, temperature)

        expr = torch.from_numpy(self.expression)
        chunk = max(1, GATHER_BLOCK_ELEMENTS // (k * len(columns)))
        means, spreads = [np.zeros((0, len(columns)), np.float32)], [np.zeros(0, np.float32)]
        for start in range(0, indices.shape[0], chunk):
            rows = torch.from_numpy(indices[start : start + chunk])
            w = weights[start : start + chunk]
            if genes is None:  # plain row gather is about twice as fast as 2-D fancy indexing
                profiles = expr.index_select(0, rows.flatten()).view(*rows.shape, -1)
            else:
                profiles = expr[rows[:, :, None], columns[None, None, :]]  # (c, k, G): requested genes only
            mean = torch.einsum("ck,ckg->cg", w, profiles)
            squared_dev = profiles.sub_(mean[:, None, :]).square_()
            means.append(mean.numpy())
            spreads.append(torch.einsum("ck,ckg->cg", w, squared_dev).sqrt().mean(dim=1).numpy())
        return RetrievalResult(
            expression=np.concatenate(means),
            similarities=scores,
            indices=indices,
            best_similarity=scores[:, 0].copy(),
            dispersion=np.concatenate(spreads),
            genes=[self.genes[i] for i in columns.tolist()],
        )

    def _sample_banks(self) -> list[tuple[np.ndarray, ReferenceBank]]:
        """One bank per reference sample with its rows in this bank (none without ``sample_ids``)."""
        if self._per_sample is None:
            codes, names = pd.factorize(np.asarray(self.sample_ids if self.sample_ids is not None else [], dtype=object))
            order = np.argsort(codes, kind="stable")  # each sample's rows, ascending, in one pass over the bank
            groups = np.split(order, np.cumsum(np.bincount(codes, minlength=len(names)))[:-1]) if len(names) else []
            self._per_sample = []
            for rows in groups:
                # a sample's rows are contiguous in banks built from SpotSets: slices share the bank's memory
                take = slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows
                self._per_sample.append((rows, ReferenceBank._trusted(
                    self.embeddings[take], self.expression[take], self.genes, None, self.default_search)))
        return self._per_sample

    def _gene_columns(self, genes: Sequence[str] | None) -> torch.Tensor:
        """Bank column of each requested gene (all genes when ``genes`` is None)."""
        if genes is None:
            return torch.arange(len(self.genes))
        if len(genes) == 0:
            raise He2stError("genes= is empty; pass None for all reference genes")
        missing = [g for g in genes if g not in self._gene_index]
        if missing:
            shown = ", ".join(missing[:20]) + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
            raise He2stError(f"{len(missing)} requested genes are not in the reference bank: {shown}")
        return torch.tensor([self._gene_index[g] for g in genes], dtype=torch.long)

    # ------------------------------------------------------------------- I/O
    def save(self, path: str | Path, pair: str | None = None) -> None:
        """Write the bank atomically as HDF5 (``.h5``/``.hdf5``) or ``.npz``; no pickled objects.

        Arrays are stored contiguous and uncompressed, so a big bank can be memory-mapped when loaded.
        An ``.h5`` bank that searches approximately stores its index too (dataset ``ivf_index``: an
        optional addition to format version 1 that readers without it ignore). ``pair``: the token of the
        checkpoint saved with it (:func:`saved_pair`).
        """
        path = Path(path)
        with atomic_path(path, suffix=path.suffix) as tmp:
            self.write(tmp, pair)

    def write(self, file: str | Path, pair: str | None = None) -> None:
        """Write the bank into ``file`` as it is (its format by its suffix): :meth:`save` without the atomic
        rename, for a caller that renames it together with other files."""
        file = Path(file)
        kind = _file_kind(file)
        arrays = {
            "embeddings": self.embeddings,
            "expression": self.expression,
            "genes": np.array(self.genes, dtype=str),
        }
        if self.sample_ids is not None:
            arrays["sample_ids"] = np.array(self.sample_ids, dtype=str)
        if kind == "npz":
            extra = {} if pair is None else {_PAIR: np.array(pair)}
            with open(file, "wb") as fh:
                np.savez(fh, format_version=np.array(_FORMAT_VERSION), **arrays, **extra)
        else:
            with h5py.File(file, "w") as f:
                f.attrs["format_version"] = _FORMAT_VERSION
                if pair is not None:
                    f.attrs[_PAIR] = pair
                for name, value in arrays.items():
                    if value.dtype.kind == "U":
                        value = value.astype(object)
                        f.create_dataset(name, data=value, dtype=h5py.string_dtype())
                    else:
                        f.create_dataset(name, data=value)
                if self._searches_approximately():
                    f.create_dataset(_INDEX, data=ann.to_bytes(self.approximate_index()))

    def _searches_approximately(self) -> bool:
        """Whether the bank's own search (``auto`` or ``approximate``) uses the index."""
        if self.default_search == "auto":
            return ann.faiss_module() is not None and len(self) > APPROXIMATE_MIN_ROWS
        return self.default_search == "approximate"

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBank:
        """Read a bank written by :meth:`save`. In an ``.h5`` bank, arrays of at least
        :data:`MMAP_MIN_BYTES` are memory-mapped rather than read (their values are not re-checked:
        he2st checked them before writing), and a stored index is read on first approximate search."""
        path = Path(path)
        kind = _file_kind(path)
        if not path.is_file():
            raise He2stError("reference bank file not found", path)
        mapped = stored_index = False
        try:
            if kind == "npz":
                with np.load(path, allow_pickle=False) as f:
                    data = {name: f[name] for name in f.files if name != _PAIR}
                    version = int(data.pop("format_version", -1))
            else:
                with h5py.File(path, "r") as f:
                    data = {}
                    for name in f:
                        if name != _INDEX:
                            memmap = _mapped(path, f[name])
                            mapped |= memmap is not None
                            data[name] = f[name][()] if memmap is None else memmap
                    version = int(f.attrs.get("format_version", -1))
                    stored_index = _INDEX in f
        except (OSError, ValueError) as exc:
            raise He2stError(f"cannot read reference bank ({exc})", path) from exc
        if version != _FORMAT_VERSION:
            raise He2stError(f"not a he2st reference bank (format version {version})", path)
        missing = {"embeddings", "expression", "genes"} - data.keys()
        if missing:
            raise He2stError(f"reference bank lacks {', '.join(sorted(missing))}", path)
        sample_ids = data.get("sample_ids")
        genes, samples = _strings(data["genes"]), None if sample_ids is None else _strings(sample_ids)
        if mapped:
            _check_shapes(data["embeddings"], data["expression"], genes, samples)
            bank = cls._trusted(data["embeddings"], data["expression"], genes, samples, "auto")
        else:
            bank = cls(data["embeddings"], data["expression"], genes, samples, normalize=False)
        bank._stored_index = path if stored_index else None
        return bank


def saved_pair(path: str | Path) -> str | None:
    """The token of the checkpoint a bank file was saved with (None: saved alone, or by an older he2st). A
    checkpoint and its banks are separate files, so a save stopped between them would otherwise leave a
    checkpoint beside another model's bank, and predict with it without a word."""
    path = Path(path)
    try:
        if _file_kind(path) == "npz":
            with np.load(path, allow_pickle=False) as f:
                return str(f[_PAIR]) if _PAIR in f.files else None
        with h5py.File(path, "r") as f:
            value = f.attrs.get(_PAIR)
    except (OSError, ValueError) as exc:
        raise He2stError(f"cannot read reference bank ({exc})", path) from exc
    return None if value is None else value.decode() if isinstance(value, bytes) else str(value)


def _mapped(path: Path, dataset: h5py.Dataset) -> np.ndarray | None:
    """``dataset`` as a copy-on-write memory map (never written back) when it is a big 2-D float32 matrix
    stored contiguous and uncompressed, else None."""
    if (dataset.ndim != 2 or dataset.dtype != np.dtype("<f4") or dataset.chunks is not None
            or dataset.nbytes < MMAP_MIN_BYTES):
        return None
    offset = dataset.id.get_offset()
    return None if offset is None else np.memmap(path, dtype="<f4", mode="c", offset=offset, shape=dataset.shape)


def _read_index(path: Path) -> Any:
    """The approximate index stored in the bank file ``path``, read in pieces."""
    try:
        with h5py.File(path, "r") as f:
            stored, position = f[_INDEX], 0

            def read(size: int) -> bytes:
                nonlocal position
                piece = stored[position : position + size].tobytes()
                position += len(piece)
                return piece

            return ann.from_reader(read)
    except (OSError, KeyError, RuntimeError) as exc:
        raise He2stError(f"cannot read the approximate index of the reference bank ({exc})", path) from exc


def _check_shapes(emb: np.ndarray, expr: np.ndarray, genes: list[str], sample_ids: Sequence[str] | None) -> None:
    """Refuse a bank whose parts do not fit together (cheap: no pass over the values)."""
    if emb.shape[0] != expr.shape[0]:
        raise He2stError(f"{emb.shape[0]} reference embeddings but {expr.shape[0]} expression rows")
    if emb.shape[0] == 0:
        raise He2stError("reference bank is empty")
    if expr.shape[1] == 0:
        raise He2stError("reference expression has no genes")
    if len(genes) != expr.shape[1]:
        raise He2stError(f"{len(genes)} gene names but {expr.shape[1]} expression columns")
    if len(set(genes)) != len(genes):
        dupes = sorted({g for g in genes if genes.count(g) > 1})
        raise He2stError(f"duplicate gene names in reference: {', '.join(dupes[:10])}")
    if sample_ids is not None and len(sample_ids) != emb.shape[0]:
        raise He2stError(f"{len(sample_ids)} sample ids for {emb.shape[0]} reference rows")


def _balanced(results: list[tuple[np.ndarray, RetrievalResult]]) -> RetrievalResult:
    """The equal-say average of per-sample retrievals (``rows`` maps each sample bank to this bank's rows)."""
    similarities = np.concatenate([r.similarities for _, r in results], axis=1)
    indices = np.concatenate([rows[r.indices] for rows, r in results], axis=1)
    order = np.argsort(-similarities, axis=1, kind="stable")
    return RetrievalResult(
        expression=np.mean([r.expression for _, r in results], axis=0, dtype=np.float32),
        similarities=np.take_along_axis(similarities, order, axis=1),
        indices=np.take_along_axis(indices, order, axis=1),
        best_similarity=np.max([r.best_similarity for _, r in results], axis=0),
        dispersion=np.mean([r.dispersion for _, r in results], axis=0, dtype=np.float32),
        genes=results[0][1].genes,
    )


def _neighbour_weights(scores: torch.Tensor, weighting: str, temperature: float) -> torch.Tensor:
    """``(n, k)`` non-negative weights summing to 1 per row."""
    if weighting == "average":
        return torch.full_like(scores, 1.0 / scores.shape[1])
    if weighting == "softmax":
        return torch.softmax(scores / temperature, dim=1)
    positive = scores.clamp(min=0)
    total = positive.sum(dim=1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[1])
    return torch.where(total > 0, positive / total.clamp(min=torch.finfo(scores.dtype).tiny), uniform)


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".h5", ".hdf5"):
        return "h5"
    raise He2stError("reference bank must be a .h5, .hdf5 or .npz file", path)


def _strings(values: np.ndarray) -> list[str]:
    """Decode a string array from npz (unicode) or HDF5 (bytes) into Python strings."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.tolist()]
