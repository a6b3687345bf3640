"""Finished benchmark tasks kept in the run folder, so that a benchmark run again reuses them.

A task -- one row label (a method and its options) on one fold, all its seeds -- is stored when it ends as
``<run>/tasks/<fold>/<label>.pkl`` under a key: the sha256 of everything that can change its numbers.

- The settings as they affect the task (:func:`task_settings`): every benchmark setting except those
  that only say where the run is written and how it is scheduled (:data:`NOT_RESULTS`), with the
  settings that choose rows (methods, ablations, per-method options, seeds) replaced by this row's own
  method, effective options and number of seeds, and by what the fold's data hold for the run's other
  methods (raw patches, token grids). A setting added to the benchmark is part of the key unless it is
  listed here.
- The sha256 of each file the fold reads (its samples, embeddings, context-field embeddings, and patch
  caches when a method trains on patches), the fold's training and test samples and their patients.
- The TLS model's weights, when TLS is scored (the TLS scores are stored with the task).
- he2st's version, a hash of every file of the installed he2st package and the versions of the numerical
  libraries (:data:`NUMERIC_LIBRARIES`), so changed code or an upgraded library recomputes.

Expression-only ``reference_sections`` enter the key by name (the dataset's files are verified by their
checksums when fetched). A stored file is read only when he2st wrote it (listed in the folder's
``.he2st-output``): task files are pickles, and a pickle can run code when read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from importlib import metadata
from pathlib import Path
from typing import Any

from he2st.data.splits import Fold
from he2st.evaluate.localisation import read_signature
from he2st.evaluate.tls import TlsModel
from he2st.io import atomic_path, check_output, inside, is_own, jsonable, path_kind, safe_name
from he2st.methods import method_class
from he2st.version import __version__
from he2st.workflows.config import BenchmarkConfig
from he2st.workflows.engines import task_threads

# settings that never change a task's numbers but through the threads they give each task (in the key as such):
# where the run is written, how its tasks are scheduled, and the learning curve (its refits on less data are
# run after the tasks, apart from them)
NOT_RESULTS = ("name", "work_dir", "engine", "workers", "address", "resume", "learning_curve", "task_threads")
# settings that choose the rows: each task's key holds its own row's part of them instead
PER_ROW = ("methods", "ablation", "ablation_only", "method_options", "seeds")


def run_settings(config: BenchmarkConfig) -> dict[str, Any]:
    """The settings shared by every row of a run that can change its numbers (read once per run: the
    localisation signature's file is digested here), with the CPU threads each task computes with, which the
    engine, its workers and ``task_threads`` decide."""
    settings = config.model_dump(mode="json", exclude=set(NOT_RESULTS + PER_ROW))
    settings["threads"] = task_threads(config.engine, config.workers, config.task_threads)
    signature = config.localisation_signature  # a file's weights, not only its name, decide the rows it scores
    if config.localisation and signature is not None:
        settings["localisation_signature_digest"] = model_digest(read_signature(signature))
    return settings


def task_settings(shared: dict[str, Any], config: BenchmarkConfig, label: str, method: str,
                  options: dict[str, Any]) -> dict[str, Any]:
    """The settings that can change the numbers of row ``label`` (``method`` with ablation ``options``):
    the run's ``shared`` settings (:func:`run_settings`) and the row's own."""
    return shared | {
        "label": label, "method": method, "options": jsonable(config.options_for(method) | options),
        "seeds": config.seeds if method_class(method).stochastic else 1,
        "fold_data": {"patches": config.needs_patches(), "tokens": config.needs_tokens()},
    }


def model_digest(model: TlsModel | None) -> str | None:
    """A digest of a TLS model's weights and intercept (None: no model)."""
    if model is None:
        return None
    text = model.weights.sort_index().to_json(double_precision=15) + repr(float(model.intercept))
    return hashlib.sha256(text.encode()).hexdigest()


# the libraries whose version can move a fitted model's numbers (a missing optional one enters as absent)
NUMERIC_LIBRARIES = ("numpy", "scipy", "scikit-learn", "torch", "pandas", "anndata", "onnxruntime", "openvino",
                     "faiss-cpu", "timm")


def library_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`NUMERIC_LIBRARIES` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def code_fingerprint() -> str:
    """he2st's version, the sha256 of every file of the installed package (compiled caches aside) and the
    versions of the numerical libraries it runs on: an upgraded library recomputes as changed code does."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(__version__.encode())
    digest.update(json.dumps(library_versions(), sort_keys=True).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()}"


def task_key(settings: dict[str, Any], fold: Fold, patients: dict[str, str], checksums: dict[str, str],
             tls: str | None) -> str:
    """The sha256 identifying a task's inputs: ``settings`` (:func:`task_settings`), the fold and its
    samples' patients, the ``checksums`` of the files the fold reads, the TLS model digest, the code."""
    record = {
        "settings": settings, "fold": fold.model_dump(mode="json"),
        "patients": {s: patients[s] for s in [*fold.train, *fold.test]}, "data": checksums, "tls_model": tls,
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _file_name(name: str, what: str) -> str:
    """``name`` as one component of a file name: fold names of nested folds join two patient ids and may
    be longer than a name may be, so a long one is cut and told apart by a digest of the whole."""
    if len(name) > 100:
        name = f"{name[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return safe_name(name, what)


class TaskStore:
    """The finished tasks of one run folder: ``<run>/tasks/<fold>/<label>.pkl``, each its key then its outcome."""

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir) / "tasks"

    def path(self, fold: str, label: str) -> Path:
        return inside(self.root, self.root / _file_name(fold, "fold name") / f"{_file_name(label, 'row label')}.pkl",
                      "task file")

    def check(self, fold: str, label: str) -> None:
        """Refuse (one line) a file at the task's place that he2st did not write, unless ``--overwrite``."""
        check_output(self.path(fold, label))

    def load(self, fold: str, label: str, key: str) -> Any | None:
        """The outcome stored for the task under ``key``; None when there is none, its key differs, it is not
        he2st's own file, or it cannot be read (a file from another he2st version)."""
        path = self.path(fold, label)
        if path_kind(path) != "file" or not is_own(path):
            return None
        try:
            with open(path, "rb") as fh:
                if pickle.load(fh) != key:
                    return None
                return pickle.load(fh)
        except Exception:  # noqa: BLE001 - a damaged or foreign-version file is recomputed, never trusted
            return None

    def save(self, fold: str, label: str, key: str, outcome: Any) -> Path:
        """Store ``outcome`` under ``key``, atomically: a run killed while writing leaves no task file."""
        path = self.path(fold, label)
        with atomic_path(path, suffix=".pkl") as tmp, open(tmp, "wb") as fh:
            pickle.dump(key, fh, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.dump(outcome, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return path
