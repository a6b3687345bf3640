"""The evaluation protocol: one method, one fold, nothing from the test patients but their images.

Per fold: the gene panel is fitted on the fold's training samples; a validation subset is drawn
from training spots; the method is fitted; test spots are assembled *without* expression and
predicted; only then is the test expression read, for scoring. HEG/HVG sets are chosen on
training data (the headline), and -- labelled ``*_testselected`` -- on each test sample as BLEEP
and CMRCNet report. Every fold returns an audit of which samples fed each fitted component.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from he2st.data.embeddings import EmbeddingFile
from he2st.data.genes import GenePanel
from he2st.data.her2st import SECTIONS, load_section, patient_of
from he2st.data.splits import Fold, validation_mask
from he2st.data.spots import SpotSet, load_spots, shared_extras
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.beyond_panel import (
    TranscriptomeTargets,
    build_transcriptome,
    celltype_scores,
    transcriptome_scores,
)
from he2st.evaluate.gene_sets import build_gene_sets, test_sample_gene_sets
from he2st.evaluate.localisation import (
    LocalisationFold,
    build_localisation_fold,
    fold_signature,
    read_signature,
)
from he2st.evaluate.markers import fold_markers
from he2st.evaluate.reliability import predictability_spearman, reliability_metrics
from he2st.evaluate.scoring import FoldResult, evaluate_fold
from he2st.methods import Method, ModelCard, Prediction, create_method, method_class
from he2st.methods.calibration import estimate_reliability
from he2st.methods.reliability import Reliability
from he2st.methods.retrieval import RetrievalMethod
from he2st.workflows.cards import model_card, view_files
from he2st.workflows.config import BenchmarkConfig
from he2st.workflows.named_scores import signature_scores
from he2st.workflows.unlabelled import unlabelled_ids, unlabelled_spots


@dataclass
class FoldAudit:
    """Sample ids that each fitted component saw (the no-leakage test reads this)."""

    test: list[str]
    panel_fitted_on: list[str]
    method_fit: list[str]
    validation: list[str]
    gene_sets_from: list[str]
    reference_bank: list[str] = field(default_factory=list)
    images_only: list[str] = field(default_factory=list)  # image features joined the fit; counts never read

    def used_for_fitting(self) -> set[str]:
        return set(self.panel_fitted_on) | set(self.method_fit) | set(self.validation) | set(
            self.gene_sets_from) | set(self.reference_bank)


@dataclass
class FoldRun:
    """One fitted method on one fold: its scores, audit, test predictions and model card."""

    result: FoldResult
    audit: FoldAudit
    predictions: dict[str, Prediction]
    card: ModelCard
    seconds: float
    method: Method | None = None  # the fitted method, for scores computed after the fold (the benchmark's TLS)
    reliability: Reliability | None = None  # the fitted method's, kept when the method is let go


@dataclass
class FoldData:
    """Everything a fold needs, built once and shared by all methods of a benchmark."""

    fold: Fold
    panel: GenePanel
    train: SpotSet
    val_mask: np.ndarray
    test_inputs: SpotSet  # no expression
    test_truth: dict[str, np.ndarray]
    gene_sets: dict[str, list[str]]
    per_sample_sets: dict[str, dict[str, list[str]]]
    reference: SpotSet | None  # expression-only spots (any patient not under test) for retrieval banks
    card: ModelCard  # panel and feature recipe shared by every method fitted on this fold
    transcriptome: TranscriptomeTargets | None = None  # whole-transcriptome bank output and truth
    celltype_truth: dict[str, np.ndarray] = field(default_factory=dict)  # test sample -> proportions
    celltype_names: list[str] = field(default_factory=list)
    unlabelled: SpotSet | None = None  # image-only spots (no expression), for histology-only learning
    localisation: LocalisationFold | None = None  # labels and baselines of held-out samples with region labels
    notes: dict[str, str] = field(default_factory=dict)  # how the fold's choices were made, in words


CELLTYPE_KEY = "celltype_major"


def build_fold_data(ws: Workspace, fold: Fold, config: BenchmarkConfig, patients: dict[str, str]) -> FoldData:
    samples = {sid: ws.load_sample(sid) for sid in fold.train}
    panel = GenePanel.from_config({sid: s.adata for sid, s in samples.items()}, config.genes)
    # count-derived annotations (e.g. cell-type proportions) for training spots, when every sample has them
    extras = shared_extras(samples.values())
    patches, views = config.needs_patches(), config.needs_views()
    train = load_spots(ws, fold.train, config.patch, config.embed, panel, with_targets=True, extras=extras,
                       with_patches=patches, with_tokens=config.needs_tokens(), views=views)
    train_patients = np.array([patients[s] for s in train.sample_ids])
    val_mask = validation_mask(train.sample_ids, config.validation_fraction, seed=config.seed, patients=train_patients)
    test_inputs = load_spots(ws, fold.test, config.patch, config.embed, panel, with_targets=False, with_patches=patches,
                             views=views)
    truth = load_spots(ws, fold.test, config.patch, config.embed, panel, with_targets=True, views=())
    test_truth = {sid: truth.targets[truth.sample_ids == sid] for sid in fold.test}
    datasets = [s.dataset for s in samples.values()]
    markers, markers_note = fold_markers(config.markers, datasets, panel.genes)
    sets = build_gene_sets(train.targets, panel.genes, markers=markers, n=config.n_top)
    per_sample = {sid: test_sample_gene_sets(y, panel.genes, n=config.n_top) for sid, y in test_truth.items()}
    reference = _reference_spots(fold, config, panel, patients)
    embeddings = EmbeddingFile(ws.embedding_path(config.embed, fold.train[0], config.patch))
    card = model_card("", panel, embeddings, config.patch, config.embed, sets,
                      {s: patients[s] for s in fold.train}, {sid: s.pixel_size_um for sid, s in samples.items()},
                      view_files(ws, config.embed, fold.train[0], config.patch, views))
    data = FoldData(fold, panel, train, val_mask, test_inputs, test_truth, sets, per_sample, reference, card)
    data.unlabelled = unlabelled_spots(ws, unlabelled_ids(config.unlabelled, ws, fold.test), config.patch,
                                       config.embed, panel, views)
    data.notes = {"markers": markers_note} if markers_note else {}
    # test expression and proportions below are read for scoring only (predictions never see them)
    test_samples = {sid: ws.load_sample(sid) for sid in fold.test}
    # dense training spots x every gene measured in all of them (gigabytes on a Visium study), read only by
    # methods that retrieve: built when one of this run's does
    if config.transcriptome_threshold is not None and any(method_class(m).retrieves for m in config.fitted_methods()):
        data.transcriptome = build_transcriptome(samples | test_samples, fold.train, fold.test, train,
                                                 panel.transform, config.transcriptome_threshold)
    if CELLTYPE_KEY in extras and all(CELLTYPE_KEY in s.adata.obsm for s in test_samples.values()):
        table = samples[fold.train[0]].adata.obsm[CELLTYPE_KEY]
        data.celltype_names = [str(c) for c in getattr(table, "columns", range(np.shape(table)[1]))]
        data.celltype_truth = {sid: np.asarray(s.adata.obsm[CELLTYPE_KEY], np.float32)
                               for sid, s in test_samples.items()}
    signature = fold_signature(config.localisation_signature, datasets) if config.localisation else None
    if signature is not None:  # test labels are read for scoring only
        data.localisation = build_localisation_fold(signature, read_signature(signature), samples | test_samples,
                                                    train, test_inputs, test_truth, panel.genes)
    return data


def allowed_references(sections: list[str], test: list[str], patients: dict[str, str]) -> list[str]:
    """The her2st ``sections`` that may join a fold's reference bank: none of a test patient. A test sample
    that is a her2st section counts by her2st's own patient too, so that a work folder naming the patient
    otherwise (a sample sheet's ``patient-A``) cannot let another section of that patient in."""
    test_patients = {patients[s] for s in test} | {patient_of(s) for s in test if s in SECTIONS}
    return [s for s in sections if patient_of(s) not in test_patients and s not in test]


def check_references(config: BenchmarkConfig, folds: list[Fold]) -> None:
    """``reference_sections`` only where a fold's held-out samples are her2st sections by name: a section is
    kept out of a fold's banks by its her2st patient, and a held-out sample under another id (a sample
    sheet's ``her2st_A1``) would let its own patient's other sections -- or itself -- into the bank its spots
    retrieve from."""
    if not config.reference_sections:
        return
    for fold in folds:
        unknown = [s for s in [*fold.test, *fold.excluded] if s not in SECTIONS]
        if unknown:
            raise He2stError(f"reference_sections adds her2st's expression-only sections, so it needs held-out "
                             f"samples named as her2st sections; fold {fold.name} holds out {unknown[0]!r}, whose "
                             "her2st patient cannot be told (drop reference_sections)")


def _reference_spots(fold: Fold, config: BenchmarkConfig, panel: GenePanel, patients: dict[str, str]) -> SpotSet | None:
    """Expression-only her2st sections whose patient is not among the fold's test patients."""
    if not config.reference_sections:
        return None
    allowed = allowed_references(config.reference_sections, [*fold.test, *fold.excluded], patients)
    if not allowed:
        return None
    ys, ids = [], []
    for section in allowed:
        sample = load_section(section, with_image=False)
        ys.append(GenePanel(**(panel.model_dump() | {"missing": "zero"})).targets(sample.adata))
        ids.append(np.full(sample.n_spots, section, dtype=object))
    y = np.concatenate(ys)
    n = len(y)
    return SpotSet(sample_ids=np.concatenate(ids), barcodes=np.arange(n).astype(str).astype(object),
                   features=np.zeros((n, 0), np.float32), coords_um=np.zeros((n, 2)), genes=panel.genes, targets=y)


def run_fold(name: str, data: FoldData, config: BenchmarkConfig, options: dict | None = None) -> FoldRun:
    """Fit ``name`` on the fold's training spots and score it on the test samples."""
    method = create_method(name, **(config.options_for(name) | (options or {})))
    method.card = data.card.model_copy(update={"method": name})
    train, val = data.train.subset(~data.val_mask), data.train.subset(data.val_mask)
    start = time.perf_counter()
    unlabelled = data.unlabelled if method.learns_from_unlabelled else None
    log = method.fit(train, val, unlabelled)
    method.card = method.card.model_copy(update={
        "curves": log.curves, "best_epoch": log.best_epoch, "train_seconds": log.seconds,
        "selection": log.selection})
    bank_ids = sorted(set(data.train.sample_ids)) if method.uses_bank else []
    if data.reference is not None and isinstance(method, RetrievalMethod):
        ref_y = np.concatenate([data.train.targets, data.reference.targets])
        ref_ids = list(data.train.sample_ids) + list(data.reference.sample_ids)
        method.bank = method.reference_bank(ref_y, data.panel.genes, ref_ids)
        bank_ids = sorted(set(ref_ids))
    calibrating = time.perf_counter()
    reliability_note = _calibrate(method, train, val, config, data.card.training_samples)
    calibration_seconds = time.perf_counter() - calibrating  # reported apart: the method's own cost stays comparable
    predictions = {}
    for sid in data.fold.test:
        predictions[sid] = method.predict(data.test_inputs.subset(data.test_inputs.sample_ids == sid))
    seconds = time.perf_counter() - start - calibration_seconds
    result = evaluate_fold(
        name, data.fold.name, {s: p.expression for s, p in predictions.items()}, data.test_truth,
        data.panel.genes, data.gene_sets, data.per_sample_sets,
    )
    if method.reliability is not None:
        _score_reliability(method, result, predictions, data.test_truth)
    result.extra = _beyond_panel(method, data, predictions)
    result.notes = dict(data.notes)
    if data.localisation is not None:
        result.localisation = data.localisation.score({s: p.expression for s, p in predictions.items()},
                                                      data.panel.genes)
        result.notes["localisation"] = data.localisation.note
    result.curves = {f"seed{method.config.seed}": log.curves}
    result.selection = {f"seed{method.config.seed}": log.selection} if log.selection else {}
    if reliability_note or method.reliability is not None:
        result.selection.setdefault(f"seed{method.config.seed}", {})["reliability"] = (
            reliability_note or f"estimated on inner folds in {calibration_seconds:.1f} s")
    audit = FoldAudit(
        test=list(data.fold.test), panel_fitted_on=list(data.panel.fitted_on),
        method_fit=sorted(set(train.sample_ids)), validation=sorted(set(val.sample_ids)),
        gene_sets_from=sorted(set(data.train.sample_ids)), reference_bank=bank_ids,
        images_only=[] if unlabelled is None else sorted(set(unlabelled.sample_ids)),
    )
    leaked = audit.used_for_fitting() & (set(audit.test) | set(data.fold.excluded))
    if leaked:  # a guard, not a check for tests only: no number is reported from a leaky fit
        raise He2stError(f"{name} fold {data.fold.name}: test sample(s) {sorted(leaked)} fed a fitted component")
    return FoldRun(result, audit, predictions, method.card, seconds, method, method.reliability)


def _calibrate(method: Method, train: SpotSet, val: SpotSet, config: BenchmarkConfig,
               patients: dict[str, str]) -> str:
    """Estimate the fitted method's reliability on inner folds of the fold's training spots (train and
    validation, in the order the fit saw them); returns why it was not, or ''."""
    if not config.wants_reliability(patients):
        return ("not estimated: fewer than 3 training patients or samples" if config.reliability is None
                else "")
    try:
        method.reliability = estimate_reliability(
            method, SpotSet.concat([train, val]) if len(val) else train, seed=config.seed,
            validation_fraction=config.validation_fraction, scores=signature_scores(method.card.target_scale))
    except He2stError as exc:
        return f"not estimated: {exc}"
    return ""


def _score_reliability(method: Method, result: FoldResult, predictions: dict[str, Prediction],
                       truth: dict[str, np.ndarray]) -> None:
    """Add each held-out sample's reliability scores to its ``all`` gene set (summary rows)."""
    rel = method.reliability
    # expected vs realised per-gene r: the realised r of the fold's held-out patients (scored per sample by
    # evaluate_fold), averaged over their samples (one section's r is noisy), so every sample of the fold
    # carries the fold's value; a gene constant in every held-out sample has no realised r
    genes = next(iter(predictions.values())).genes
    realised = result.per_gene.groupby("gene", sort=False)["pearson"].mean().reindex(genes)
    ranking = predictability_spearman(rel.gene_columns(genes)["expected_r"], realised.to_numpy(dtype=np.float64))
    for sid, pred in predictions.items():
        constant = rel.intervals(pred.expression, np.ones(len(pred.expression)), 0.9, normalised=False)
        scores = reliability_metrics(
            pred.expression, truth[sid], np.stack([pred.layers["lower"], pred.layers["upper"]]),
            np.stack(constant), pred.uncertainty["ood_score"], pred.uncertainty["in_distribution"])
        result.per_sample[sid].setdefault("all", {}).update(scores | {"predictability_spearman": ranking})


def _beyond_panel(method: Method, data: FoldData, predictions: dict[str, Prediction]) -> dict[str, float]:
    """Cell-type proportion scores (methods that predict them) and whole-transcriptome scores (retrieval
    methods, through a second bank of the fold's training spots returning every gene they all measured;
    the method's own bank is left as it was scored)."""
    extra: dict[str, float] = {}
    if data.celltype_truth and all(CELLTYPE_KEY in p.extras for p in predictions.values()):
        predicted = {s: p.extras[CELLTYPE_KEY] for s, p in predictions.items()}
        extra |= celltype_scores(predicted, data.celltype_truth, data.celltype_names)
    tx = data.transcriptome
    if tx is not None and method.retrieves:
        bank = method.transcriptome_reference(data.train, tx.train, tx.genes)
        whole = {sid: method.retrieve(data.test_inputs.subset(data.test_inputs.sample_ids == sid), bank).expression
                 for sid in data.fold.test}
        extra |= transcriptome_scores(whole, tx.genes, tx)
    return extra
