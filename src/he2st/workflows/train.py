"""``he2st train``: fit one method on chosen training samples and save a self-describing checkpoint.

With ``devices`` > 1 (or under ``torchrun``) every process loads the same spots and trains on its share
of each batch (:mod:`he2st.methods.distributed`); rank 0 writes the embedding cache first and saves the
checkpoint, which the calling process then loads. With ``engine`` local or ray, the independent fits inside
the fit (the ensemble's inner folds and refits, the reliability's inner folds) run ``workers`` at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from he2st.data.datasets import DATASETS, get_dataset
from he2st.data.embeddings import EmbeddingFile
from he2st.data.genes import GenePanel
from he2st.data.splits import held_out_groups, validation_mask
from he2st.data.spots import SpotSet, load_spots, shared_extras
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.beyond_panel import build_transcriptome
from he2st.evaluate.gene_sets import build_gene_sets
from he2st.io import check_output
from he2st.methods import Method, TrainLog, create_method, distributed, load_method
from he2st.methods.calibration import estimate_reliability
from he2st.methods.inner_tasks import inner_tasks
from he2st.workflows.cards import model_card, view_files
from he2st.workflows.config import TrainRunConfig
from he2st.workflows.embed import embed_workspace
from he2st.workflows.engines import task_runner
from he2st.workflows.named_scores import signature_scores
from he2st.workflows.unlabelled import unlabelled_ids, unlabelled_spots


def train_model(config: TrainRunConfig, command: str = "") -> tuple[Method, TrainLog, Path]:
    """Fit ``config.method`` on the training samples (validation from their patients) and save it with
    its model card (which records ``command``)."""
    if config.engine != "serial" and (config.devices > 1 or distributed.launched()):
        raise He2stError("--engine runs a fit's inner fits as tasks of their own and cannot be combined with "
                         "data-parallel training (--devices > 1 or torchrun): choose one")
    if config.devices == 1 and not distributed.launched():
        return _train(config, command)
    path = distributed.launch(_train_ranks, config.devices, config, command)
    method = load_method(path)
    card = method.card
    return method, TrainLog(card.curves, card.best_epoch, card.train_seconds or 0.0, card.selection), path


def _train_ranks(config: TrainRunConfig, command: str) -> Path:
    """One rank's share of :func:`train_model`: the checkpoint's path once rank 0 has saved it."""
    path = _train(config, command)[2]
    distributed.barrier()
    return path


def _train(config: TrainRunConfig, command: str) -> tuple[Method, TrainLog, Path]:
    ws = Workspace(config.work_dir)
    train_ids = config.train_samples or ws.sample_ids()
    if not train_ids:
        raise He2stError(f"no training samples: none prepared in {ws.root}")
    method = create_method(config.method, **config.options_for(config.method))
    if config.transcriptome_threshold is not None and not method.retrieves:
        raise He2stError(f"transcriptome_threshold: method {config.method!r} does not predict by retrieval, so it "
                         "cannot return genes beyond its panel; use knn, bleep, cmrcnet or carhe")
    out = Path(config.out or ws.root / "models" / f"{config.method}.pt")
    check_output(out)  # before any work: a file he2st did not write is refused (the banks beside it too)
    check_output(Method.bank_path(out))
    check_output(Method.transcriptome_path(out))
    samples = {sid: ws.load_sample(sid) for sid in train_ids}
    unlabelled = unlabelled_ids(config.unlabelled, ws)  # before any work: a name not prepared is refused
    if unlabelled and not method.learns_from_unlabelled:
        raise He2stError(f"unlabelled: method {config.method!r} does not learn from image-only spots; use carhe "
                         "(with histology_transfer on)")
    panel = GenePanel.from_config({sid: s.adata for sid, s in samples.items()}, config.genes)
    with distributed.main_first():
        paths = embed_workspace(ws, list(dict.fromkeys(train_ids + unlabelled)), config.patch, config.embed).paths
    views = method.reads_views
    spots = load_spots(ws, train_ids, config.patch, config.embed, panel, with_targets=True,
                       extras=shared_extras(samples.values()), with_patches=config.needs_patches(),
                       with_tokens=config.needs_tokens(), views=views)
    patients = np.array([samples[s].patient_id for s in spots.sample_ids])
    val = validation_mask(spots.sample_ids, config.validation_fraction, seed=config.seed, patients=patients)
    method.card = model_card(
        config.method, panel, EmbeddingFile(paths[train_ids[0]]), config.patch, config.embed,
        build_gene_sets(spots.targets, panel.genes, n=config.n_top),
        {sid: s.patient_id for sid, s in samples.items()},
        {sid: s.pixel_size_um for sid, s in samples.items()},
        view_files(ws, config.embed, train_ids[0], config.patch, views))
    if config.reliability and not held_out_groups(method.training_groups(spots), 2):
        raise He2stError("reliability=true needs at least 2 training patients or samples to hold out; "
                         f"the training samples ({', '.join(train_ids)}) form one group")
    with task_runner(config.engine, config.workers, config.address, config.task_threads) as runner, \
            inner_tasks(runner):  # the ensemble's inner fits and refits, and the reliability's inner folds
        log = method.fit(spots.subset(~val), spots.subset(val),
                         unlabelled_spots(ws, unlabelled, config.patch, config.embed, panel, views))
        beyond, beyond_genes = None, None
        if config.transcriptome_threshold is not None:
            beyond, beyond_genes = _add_transcriptome(method, samples, train_ids, spots, config.transcriptome_threshold)
        if config.wants_reliability(method.card.training_samples):
            method.reliability = estimate_reliability(  # the spots in the order the fit saw them
                method, SpotSet.concat([spots.subset(~val), spots.subset(val)]), seed=config.seed,
                validation_fraction=config.validation_fraction,
                beyond=None if beyond is None else np.concatenate([beyond[~val], beyond[val]]),
                beyond_genes=beyond_genes, scores=signature_scores(method.card.target_scale))
    read = method.reads_views  # a method choosing among views was given more than it kept
    method.card = method.card.model_copy(update={
        "view_encoders": {v: r for v, r in method.card.view_encoders.items() if v in read},
        "adapted_views": {v: r for v, r in method.card.adapted_views.items() if v in read},
        "curves": log.curves, "best_epoch": log.best_epoch, "train_seconds": log.seconds,
        "selection": log.selection | ({"unlabelled_images": unlabelled} if unlabelled else {}),
        "command": command, "tissue": config.tissue or _tissue(samples.values()),
        "reliability": method.reliability.summary() if method.reliability is not None else {}})
    if distributed.is_main():
        method.save(out)
    return method, log, Path(out)


def _add_transcriptome(method: Method, samples: dict, train_ids: list[str], spots: SpotSet,
                       threshold: float) -> tuple[np.ndarray, list[str]]:
    """Give ``method`` a second bank of every training spot returning each gene measured in all training samples
    whose mean training expression (on the panel's scale) is at least ``threshold``, and record it in its card;
    returns the training spots' values of the genes beyond the panel, and those genes."""
    tx = build_transcriptome(samples, train_ids, [], spots, method.panel.transform, threshold)
    position = {g: i for i, g in enumerate(tx.genes)}
    columns = [position[g] for g in tx.scored]
    method.transcriptome_bank = method.transcriptome_reference(spots, tx.train[:, columns], tx.scored)
    method.card = method.card.model_copy(update={"transcriptome": {
        "threshold": threshold, "n_genes": len(tx.scored),
        "beyond_panel": len(set(tx.scored) - set(method.panel.genes)), "measured_in_all": len(tx.genes)}})
    panel = set(method.panel.genes)
    outside = [i for i, g in enumerate(tx.scored) if g not in panel]
    return tx.train[:, [columns[i] for i in outside]], [tx.scored[i] for i in outside]


def _tissue(samples) -> str:
    """The registered datasets' own description of the training samples (before its first colon)."""
    names = sorted({s.dataset for s in samples if s.dataset in DATASETS})
    return "; ".join(get_dataset(name).description.split(":")[0] for name in names)

