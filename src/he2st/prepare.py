"""``he2st prepare``: raw dataset files -> prepared samples, patch caches, folds and per-fold gene panels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from he2st.config import PrepareConfig, SampleSource
from he2st.data.genes import GenePanel
from he2st.data.her2st import load_her2st
from he2st.data.patches import extract_patches
from he2st.data.readers import read_h5ad_sample, read_hest, read_st, read_visium
from he2st.data.registry import dataset_dir, fetch
from he2st.data.sample import Sample
from he2st.data.splits import check_fold, make_folds
from he2st.errors import He2stError
from he2st.workspace import Workspace


@dataclass
class Prepared:
    workspace: Workspace
    sample_ids: list[str]
    patients: dict[str, str]
    folds_path: str


def read_source(src: SampleSource) -> Sample:
    """Read a user-described sample with the matching reader."""
    if src.reader == "visium":
        return read_visium(src.path, src.image, sample_id=src.sample_id, patient_id=src.patient_id)
    if src.reader == "st":
        if src.spots_file is None:
            raise He2stError(f"sample {src.sample_id}: reader 'st' needs spots_file")
        return read_st(src.path, src.spots_file, src.image, src.sample_id, src.patient_id or src.sample_id)
    if src.reader == "hest":
        return read_hest(src.path, src.sample_id, patient_id=src.patient_id)
    if src.pixel_size_um is None:
        raise He2stError(f"sample {src.sample_id}: reader 'h5ad' needs pixel_size_um")
    return read_h5ad_sample(src.path, src.image, src.pixel_size_um, src.sample_id, src.patient_id)


def load_samples(config: PrepareConfig) -> list[Sample]:
    """All samples the config names: a registered dataset (fetched/verified first) and/or own samples."""
    samples: list[Sample] = []
    if config.data.dataset:
        if config.data.dataset != "her2st":
            raise He2stError(f"dataset {config.data.dataset!r} has no sample loader yet (available: her2st)")
        fetch(config.data.dataset)
        samples += load_her2st(config.data.sections, root=dataset_dir(config.data.dataset))
    samples += [read_source(src) for src in config.data.samples]
    if not samples:
        raise He2stError("no samples: set data.dataset or list data.samples")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise He2stError(f"duplicate sample ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return samples


def prepare(config: PrepareConfig, on_patch: Callable[[int], None] | None = None,
            on_sample: Callable[[Sample], None] | None = None) -> Prepared:
    """Save samples, cut patches, define folds and fit one gene panel per fold on its training samples."""
    ws = Workspace(config.work_dir)
    samples = load_samples(config)
    for sample in samples:
        sample.save(ws.sample_path(sample.sample_id))  # always: patient ids or counts may have changed
        extract_patches(sample, config.patch, ws.root, on_progress=on_patch)
        sample.close()
        if on_sample is not None:
            on_sample(sample)
    patients = {s.sample_id: s.patient_id for s in samples}
    folds = make_folds(patients, config.folds.scheme, config.folds.allow_shared_patients)
    by_id = {s.sample_id: s for s in samples}
    for fold in folds:
        check_fold(fold, patients)
        panel = GenePanel.from_config({sid: by_id[sid].adata for sid in fold.train}, config.genes)
        panel.save(ws.panel_path(config.folds.scheme, fold.name))
    folds_path = ws.save_folds(config.folds.scheme, folds, patients)
    return Prepared(ws, [s.sample_id for s in samples], patients, str(folds_path))
