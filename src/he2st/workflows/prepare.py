"""``he2st prepare``: raw dataset files -> prepared samples, patch caches and patient-level folds.

Gene panels are not prepared here: each fold fits its own on its training samples when it runs, so a
panel can never be fitted with settings other than the run's."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from he2st.data.datasets import dataset_dir, fetch
from he2st.data.her2st import load_her2st
from he2st.data.patches import extract_patches, patch_cache_path, warn_if_too_coarse
from he2st.data.readers import SourceOptions, read_source
from he2st.data.sample import Sample
from he2st.data.splits import check_fold, make_folds
from he2st.data.workspace import Workspace
from he2st.errors import He2stError, He2stWarning
from he2st.io import check_output, safe_name
from he2st.workflows.config import PrepareConfig
from he2st.workflows.samplesheet import SHEET_NAME, save_sheet, sheet_sources


@dataclass
class Prepared:
    workspace: Workspace
    sample_ids: list[str]
    patients: dict[str, str]
    folds_path: str  # "" when the samples are too few for the scheme (see ``note``)
    note: str = ""


def load_samples(config: PrepareConfig, sheet: list[SourceOptions] | None = None) -> list[Sample]:
    """All samples the config names: a registered dataset (fetched/verified first) and/or own samples
    (``sheet``: the sources of its sample sheet or searched folder, when already read). Each is checked to
    be preparable -- a safe id, an H&E -- so that a refused run has written nothing."""
    samples: list[Sample] = []
    if config.data.dataset:
        if config.data.dataset != "her2st":
            raise He2stError(f"dataset {config.data.dataset!r} has no sample loader yet (available: her2st)")
        fetch(config.data.dataset)
        samples += load_her2st(config.data.sections, root=dataset_dir(config.data.dataset))
    if sheet is None:
        sheet = sheet_sources(config.data.samplesheet, config.data.from_dir, config.work_dir)
    samples += [read_source(src) for src in [*config.data.samples, *sheet]]
    if not samples:
        raise He2stError("no samples: set data.dataset, list data.samples, or give --samplesheet or --from-dir")
    for s in samples:  # ids from file names and metadata too, not only from the config
        safe_name(s.sample_id, "sample id")
        safe_name(s.patient_id, f"patient id of sample {s.sample_id}")
        s.require_image()  # patches are cut from it: refused before any sample is saved
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise He2stError(f"duplicate sample ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return samples


def prepare(config: PrepareConfig, on_patch: Callable[..., None] | None = None,
            on_sample: Callable[[Sample], None] | None = None) -> Prepared:
    """Save samples, cut patches and define folds; ``on_patch(n, total=...)`` follows the patches cut."""
    ws = Workspace(config.work_dir)
    sheet = sheet_sources(config.data.samplesheet, config.data.from_dir, config.work_dir)
    samples = load_samples(config, sheet)
    if on_patch is not None:
        on_patch(0, total=sum(s.n_spots for s in samples) * (2 if config.context_field else 1))
    patients = {s.sample_id: s.patient_id for s in samples}
    groups = set(patients.values()) if config.folds.scheme == "lopo" else set(patients)
    folds = (make_folds(patients, config.folds.scheme, config.folds.allow_shared_patients)  # before heavy work
             if len(groups) >= 2 else None)
    for fold in folds or []:
        check_fold(fold, patients)
    specs = [config.patch, *([config.patch.context_field()] if config.context_field else [])]
    outputs = [path for s in samples for path in (ws.sample_path(s.sample_id),
                                                  *(patch_cache_path(ws.root, s.sample_id, spec) for spec in specs))]
    for path in [*outputs, ws.folds_path(config.folds.scheme), *([ws.root / SHEET_NAME] if sheet else [])]:
        check_output(path)  # a foreign file anywhere is refused before the first sample is written
    new = [path for path in outputs if not path.exists()]
    try:
        for sample in samples:
            warn_if_too_coarse(sample, config.patch)
            sample.save(ws.sample_path(sample.sample_id))  # always: patient ids or counts may have changed
            for spec in specs:
                extract_patches(sample, spec, ws.root, on_progress=on_patch)
            sample.close()
            if on_sample is not None:
                on_sample(sample)
    except He2stError:  # bad input found part-way (a damaged image): the samples and patches this run added go
        # again; an interrupted run keeps them, as a rerun reuses finished patch files
        for path in new:
            path.unlink(missing_ok=True)
        raise
    if sheet:  # what this run read, to repeat it; written last, so that a failed run leaves none
        save_sheet(config.work_dir, sheet)
    ids = [s.sample_id for s in samples]
    _warn_stale(ws, ids, config.folds.scheme, folds is None)
    if folds is None:
        what = "patient" if config.folds.scheme == "lopo" else "sample"
        return Prepared(ws, ids, patients, "", f"one {what} only: no {config.folds.scheme} folds (benchmarking needs "
                                               f"at least 2); the sample can be used for training or prediction")
    folds_path = ws.save_folds(config.folds.scheme, folds, patients)
    return Prepared(ws, ids, patients, str(folds_path))


def _warn_stale(ws: Workspace, ids: list[str], scheme: str, no_folds: bool) -> None:
    """One warning line naming what an earlier prepare left in the work folder that this run did not write:
    samples it no longer lists (``embed`` and ``train`` take every prepared sample, so they would still use
    them) and, when this run makes no folds, the earlier folds file (``benchmark`` would still run it)."""
    stale = sorted(set(ws.sample_ids()) - set(ids))
    old_folds = no_folds and ws.folds_path(scheme).exists()
    if not stale and not old_folds:
        return
    left = [f"sample(s) {', '.join(stale)} in {ws.root / 'samples'} (`embed` and `train` still use them)"] if stale else []
    left += [f"{ws.folds_path(scheme)} (`benchmark` still runs it)"] if old_folds else []
    warnings.warn(f"{ws.root}: {' and '.join(left)} left from an earlier prepare, not part of this one; remove them "
                  "or prepare into a new work folder",
                  He2stWarning, stacklevel=3)
