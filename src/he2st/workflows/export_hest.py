"""``he2st data export-hest``: a prepared work folder written as one HEST-Benchmark task, so a study's own
sections are benchmarked exactly as HEST's tasks are (by ``he2st hest-bench`` or HEST's own script).

What is written under ``<out>/<task>/``: ``patches/<sample>.h5`` (the prepared spot patches: ``img``,
``barcode``, ``coords``), ``adata/<sample>.h5ad`` (raw counts, every gene), ``splits/train_{i}.csv`` and
``test_{i}.csv`` (leave one patient out: split ``i`` tests the ``i``-th patient in sorted order and trains on
all others; a ``patient_id`` column is added, which HEST's reader ignores) and ``var_50genes.json``.

Gene rule: genes measured in every exported sample and detected (count > 0) in at least 10% of their pooled
spots; of those, the ``n_genes`` with the highest variance (``hvg``, the default: the file's name says
"var") or mean (``heg``) of log1p raw counts over all exported spots, ties broken by name. Like HEST's
published lists, it is one list per task, so every split's test patient takes part in choosing the genes
(never in fitting a model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from he2st.data.genes import GenePanel
from he2st.data.hest_layout import GENES_FILE, SPLITS_DIR, BenchSample, copy_patch_file, write_expression, \
    write_genes, write_split
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.splits import leave_one_patient_out
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.io import LOCKS, inside, is_own, safe_name, write_text_atomic
from he2st.io import MARKER as IO_MARKER

MARKER = ".he2st-export"  # in the task folder: a re-export may replace it; any other non-empty folder is refused
MIN_SPOT_FRACTION = 0.1


@dataclass
class Exported:
    root: Path
    samples: list[str]
    genes: list[str]
    n_splits: int


def export_hest(work_dir: str | Path, out: str | Path, task: str, patch: PatchSpec,
                sample_ids: Sequence[str] | None = None, n_genes: int = 50, selection: str = "hvg") -> Exported:
    """Write the samples of ``work_dir`` (default: all prepared) as task ``task`` of the benchmark folder ``out``."""
    if selection not in ("hvg", "heg"):
        raise He2stError(f"unknown gene selection {selection!r}; use 'hvg' or 'heg'")
    ws = Workspace(work_dir)
    ids = list(sample_ids or ws.sample_ids())
    if not ids:
        raise He2stError(f"no prepared samples in {ws.root}; run `he2st prepare` first")
    samples = {sid: ws.load_sample(sid) for sid in ids}
    patients = {sid: s.patient_id for sid, s in samples.items()}
    folds = leave_one_patient_out(patients)  # refuses a single patient before anything is written
    genes = GenePanel.fit({sid: s.adata for sid, s in samples.items()}, n_genes=n_genes, selection=selection,
                          transform="log1p", min_spot_fraction=MIN_SPOT_FRACTION).genes
    root = inside(out, Path(out) / safe_name(task, "task name"), "task folder")
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise He2stError("task folder is not empty and was not written by `he2st data export-hest`; "
                         "choose another --task or --out", root)
    caches = {}
    for sid, sample in samples.items():  # every patch cache checked before anything is written or removed
        cache = PatchCache(ws.patch_path(sid, patch))
        cache.check(patch)
        if cache.barcodes != list(sample.adata.obs_names):
            raise He2stError(f"patches of {sid} do not match its spots; re-run `he2st prepare`", cache.path)
        caches[sid] = cache
    stale = _old_splits(root / SPLITS_DIR)
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / MARKER, "written by `he2st data export-hest`; a re-export may replace it\n")
    entries = {sid: BenchSample(sid, copy_patch_file(caches[sid].path, root / "patches" / f"{sid}.h5"),
                                write_expression(root / "adata" / f"{sid}.h5ad", sample.adata), patients[sid])
               for sid, sample in samples.items()}
    for old in stale:  # HEST counts every file in splits/ as half a split: the old export's go
        old.unlink()
    for i, fold in enumerate(folds):
        write_split(root / SPLITS_DIR, i, [entries[s] for s in fold.train], [entries[s] for s in fold.test], root)
    write_genes(root / GENES_FILE, genes)
    return Exported(root, ids, genes, len(folds))


def _old_splits(folder: Path) -> list[Path]:
    """The split files of an earlier export in ``folder``, to be replaced. A file there that he2st did not
    write (a split of the user's own) is refused in one line rather than removed: HEST would count it as half
    a split of this task, and it is not he2st's to delete."""
    files = sorted(p for p in folder.glob("*") if p.name not in (IO_MARKER, LOCKS)) if folder.is_dir() else []
    for path in files:
        if not path.is_file() or not is_own(path):
            raise He2stError("is in the task's splits folder but was not written by `he2st data export-hest` (HEST "
                             "counts every file there as part of a split); move it away or choose another --task",
                             path)
    return files
