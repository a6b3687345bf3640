"""HEST-Benchmark's folder layout, read and written: the contract ``he2st hest-bench`` and
``he2st data export-hest`` share.

A benchmark folder holds one folder per task (``IDC/``, ``PRAD/``, ...), each with
``splits/train_{i}.csv`` and ``splits/test_{i}.csv`` (columns ``sample_id``, ``patches_path``,
``expr_path``; paths relative to the task folder), ``var_50genes.json`` (``{"genes": [...]}``),
patch files (HDF5: ``img`` N x H x W x 3 uint8, ``barcode``, ``coords``) and expression files
(``.h5ad``, spots x genes of raw counts, obs index = barcodes). This is the layout HEST publishes
(mahmoodlab/HEST ``src/hest/bench/benchmark.py``); an optional ``patient_id`` column in the split
files, which HEST's own reader ignores, lets he2st draw validation spots by patient.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from he2st.data.sample_header import is_missing
from he2st.errors import He2stError
from he2st.io import atomic_path, safe_name, write_text_atomic

GENES_FILE = "var_50genes.json"
SPLITS_DIR = "splits"
SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
_SPLIT_NAME = re.compile(r"(train|test)_(\d+)\.csv")


@dataclass(frozen=True)
class BenchSample:
    """One section of a task: its patch file, its expression file and its patient (its id when unknown)."""

    sample_id: str
    patches: Path
    expression: Path
    patient_id: str


@dataclass(frozen=True)
class BenchSplit:
    """One train/test split of a task, in the order its CSV rows list the samples."""

    index: int
    train: list[BenchSample]
    test: list[BenchSample]


@dataclass
class BenchTask:
    """A task folder: its genes and its splits."""

    name: str
    root: Path
    genes: list[str]
    splits: list[BenchSplit] = field(default_factory=list)

    def samples(self) -> dict[str, BenchSample]:
        """Every sample any split names, by id (one entry each, however many splits use it)."""
        out: dict[str, BenchSample] = {}
        for split in self.splits:
            for sample in [*split.train, *split.test]:
                known = out.setdefault(sample.sample_id, sample)
                if known != sample:
                    raise He2stError(f"sample {sample.sample_id!r} names different files in different splits",
                                     self.root / SPLITS_DIR)
        return out


# ----------------------------------------------------------------------------- reading
def find_tasks(bench_dir: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """The task folders of ``bench_dir`` (those holding ``splits/``), sorted, or the ``names`` asked for."""
    root = Path(bench_dir)
    if not root.is_dir():
        raise He2stError("benchmark folder not found", root)
    available = sorted(p for p in root.iterdir() if (p / SPLITS_DIR).is_dir())
    if names is None:
        if not available:
            raise He2stError(f"no task folders (a folder with {SPLITS_DIR}/) in the benchmark folder", root)
        return available
    by_name = {p.name: p for p in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise He2stError(f"no task folder {unknown[0]!r} with {SPLITS_DIR}/ (available: "
                         f"{', '.join(by_name) or 'none'})", root)
    return [by_name[n] for n in names]


def read_genes(path: str | Path) -> list[str]:
    """The task's gene list (``{"genes": [...]}``), refused when missing, malformed, empty or repeating a gene."""
    path = Path(path)
    if not path.exists():
        raise He2stError("gene list not found (each task folder needs one)", path)
    try:
        genes = json.loads(path.read_text())["genes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise He2stError(f'not a gene list {{"genes": [...]}} ({type(exc).__name__})', path) from exc
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        raise He2stError('"genes" must be a non-empty list of gene names', path)
    if len(set(genes)) != len(genes):
        raise He2stError("the gene list names some genes more than once", path)
    return genes


def read_split_csv(path: Path, task_root: Path) -> list[BenchSample]:
    """The samples of one split file, paths resolved against the task folder."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise He2stError(f"not a readable split table ({type(exc).__name__})", path) from exc
    missing = [c for c in SPLIT_COLUMNS if c not in table.columns]
    if missing:
        raise He2stError(f"split table lacks column(s) {', '.join(missing)} (needs {', '.join(SPLIT_COLUMNS)})", path)
    if table.empty:
        raise He2stError("split table lists no samples", path)
    samples = []
    for row in table.itertuples(index=False):
        sid = _id(row.sample_id, "sample id", path)
        patient = getattr(row, "patient_id", None)
        samples.append(BenchSample(
            sample_id=sid, patches=task_root / str(row.patches_path), expression=task_root / str(row.expr_path),
            patient_id=sid if is_missing(patient) else _id(patient, "patient id", path)))
    return samples


def read_task(task_dir: str | Path) -> BenchTask:
    """A task folder: ``var_50genes.json`` and every ``train_{i}``/``test_{i}`` pair, ``i`` = 0, 1, ...

    HEST counts its splits as half the files in ``splits/`` and reads ``train_{i}``/``test_{i}``; here a
    file without its partner, or a gap in the numbering, is refused instead of silently skipped."""
    root = Path(task_dir)
    genes = read_genes(root / GENES_FILE)
    split_dir = root / SPLITS_DIR
    found: dict[str, set[int]] = {"train": set(), "test": set()}
    for p in split_dir.iterdir():
        match = _SPLIT_NAME.fullmatch(p.name)
        if match:
            found[match.group(1)].add(int(match.group(2)))
    if not found["train"] and not found["test"]:
        raise He2stError("no train_{i}.csv / test_{i}.csv split files", split_dir)
    if found["train"] != found["test"]:
        lone = sorted(found["train"] ^ found["test"])[0]
        kind = "train" if lone in found["train"] else "test"
        raise He2stError(f"{kind}_{lone}.csv has no {'test' if kind == 'train' else 'train'}_{lone}.csv", split_dir)
    if found["train"] != set(range(len(found["train"]))):
        raise He2stError(f"split files must be numbered 0..n-1, found {sorted(found['train'])}", split_dir)
    splits = []
    for i in range(len(found["train"])):
        train = read_split_csv(split_dir / f"train_{i}.csv", root)
        test = read_split_csv(split_dir / f"test_{i}.csv", root)
        shared = {s.sample_id for s in train} & {s.sample_id for s in test}
        if shared:
            raise He2stError(f"sample(s) {sorted(shared)} are both in train_{i}.csv and test_{i}.csv", split_dir)
        shared = {s.patient_id for s in train} & {s.patient_id for s in test}
        if shared:  # sections of one patient on both sides: every score of the split would be inflated
            raise He2stError(f"patient(s) {sorted(shared)} have samples in both train_{i}.csv and test_{i}.csv; a "
                             "split must hold out whole patients", split_dir)
        splits.append(BenchSplit(i, train, test))
    task = BenchTask(root.name, root, genes, splits)
    task.samples()  # one file per sample id across splits
    return task


def read_patch_index(path: Path) -> tuple[list[str], np.ndarray]:
    """Barcodes and ``coords`` (top-left x, y in slide pixels) of a patch file, in its row order
    (``barcode`` as HEST writes it, N or N x 1; ``barcodes`` accepted)."""
    if not path.exists():
        raise He2stError("patch file not found", path)
    try:
        with h5py.File(path, "r") as fh:
            n = len(fh["img"])
            raw = np.asarray(fh["barcode" if "barcode" in fh else "barcodes"][:]).reshape(n, -1)[:, 0]
            coords = np.asarray(fh["coords"][:], dtype=np.float64).reshape(n, 2)
    except (OSError, KeyError, ValueError) as exc:
        raise He2stError(f"not a readable patch file with img, barcode and coords ({type(exc).__name__}: {exc})",
                         path) from exc
    return [b.decode() if isinstance(b, bytes) else str(b) for b in raw], coords


def iter_patch_images(path: Path, chunk: int) -> Iterator[np.ndarray]:
    """The patch file's ``img`` rows, ``chunk`` at a time, as uint8 (n, H, W, 3)."""
    with h5py.File(path, "r") as fh:
        images = fh["img"]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise He2stError(f"img must be N x H x W x 3, got shape {images.shape}", path)
        for start in range(0, len(images), chunk):
            yield np.asarray(images[start : start + chunk], dtype=np.uint8)


def read_counts(path: Path, genes: Sequence[str], barcodes: Sequence[str]) -> np.ndarray:
    """Raw counts (len(barcodes) x len(genes), float64) of an expression file, rows in ``barcodes``' order --
    what HEST's ``load_adata`` selects (``adata[barcodes][:, genes]``) before normalising."""
    if not path.exists():
        raise He2stError("expression file not found", path)
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for bad files
        raise He2stError(f"not a readable .h5ad file ({type(exc).__name__}: {exc})", path) from exc
    rows = pd.Index(adata.obs_names).get_indexer(list(barcodes))
    if (rows < 0).any():
        missing = [b for b, r in zip(barcodes, rows, strict=True) if r < 0]
        raise He2stError(f"{len(missing)} barcode(s) of the patch file are not spots here (first: {missing[0]!r})",
                         path)
    cols = pd.Index(adata.var_names).get_indexer(list(genes))
    if (cols < 0).any():
        absent = [g for g, c in zip(genes, cols, strict=True) if c < 0]
        raise He2stError(f"{len(absent)} gene(s) of {GENES_FILE} not measured here (e.g. {', '.join(absent[:5])})",
                         path)
    matrix = adata.X[rows][:, cols]
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float64)


def _id(value: object, what: str, path: Path) -> str:
    try:
        return safe_name(str(value), what)
    except He2stError as exc:
        raise He2stError(exc.problem, path) from None


# ----------------------------------------------------------------------------- writing
def copy_patch_file(source: Path, path: Path) -> Path:
    """A patch file as HEST writes it (``img``, ``barcode`` as N x 1 bytes, ``coords`` top-left x, y), copied
    from a file with the same datasets (he2st's patch caches) without loading every patch at once."""
    barcodes, coords = read_patch_index(source)
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(source, "r") as src, h5py.File(tmp, "w") as fh:
            src.copy(src["img"], fh, "img", without_attrs=True)
            fh.create_dataset("barcode", data=np.array([[b.encode()] for b in barcodes]))
            fh.create_dataset("coords", data=np.round(coords).astype(np.int64))
    return path


def write_expression(path: Path, adata: ad.AnnData) -> Path:
    """Spots x genes raw counts with the barcodes as obs index (only ``X``, names and ``obsm['spatial']``)."""
    out = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32),
                     obs=pd.DataFrame(index=pd.Index(adata.obs_names.astype(str), name="barcode")),
                     var=pd.DataFrame(index=pd.Index(adata.var_names.astype(str), name="gene")))
    if "spatial" in adata.obsm:
        out.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    with atomic_path(path, suffix=".h5ad") as tmp:
        out.write_h5ad(tmp)
    return path


def write_split(split_dir: Path, index: int, train: Sequence[BenchSample], test: Sequence[BenchSample],
                task_root: Path) -> None:
    """``train_{index}.csv`` and ``test_{index}.csv`` with task-relative paths and the patient column."""
    for kind, samples in (("train", train), ("test", test)):
        table = pd.DataFrame([{
            "sample_id": s.sample_id, "patches_path": s.patches.relative_to(task_root).as_posix(),
            "expr_path": s.expression.relative_to(task_root).as_posix(), "patient_id": s.patient_id,
        } for s in samples])
        write_text_atomic(split_dir / f"{kind}_{index}.csv", table.to_csv(index=False))


def write_genes(path: Path, genes: Sequence[str]) -> Path:
    write_text_atomic(path, json.dumps({"genes": list(genes)}, indent=1) + "\n")
    return path
