"""Scores beyond the gene panel: the whole transcriptome predicted by retrieval, and cell-type
proportions predicted from the image.

Retrieval methods can return any gene the reference spots measured, not only the panel they were
trained on (CarHE's >10,000-gene prediction). :func:`build_transcriptome` fixes, from the fold's
*training* samples only, which genes the bank returns (every gene measured in all of them) and which
are scored (mean transformed expression over training spots >= a threshold, so near-silent genes --
whose correlation is noise -- do not dilute the mean). Test expression is read only to score.

Cell-type proportions (CarHE's third modality) are scored per type: Pearson across the spots of a
held-out sample between predicted and deconvolved proportions, averaged over test samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from he2st.data.genes import transform_counts
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.evaluate.metrics import pearson_per_gene

__all__ = ["TranscriptomeTargets", "build_transcriptome", "celltype_scores", "transcriptome_scores"]


@dataclass
class TranscriptomeTargets:
    """Whole-transcriptome reference expression of a fold's training spots, and the test truth."""

    genes: list[str]  # what the bank returns: measured in every training sample
    scored: list[str]  # what is scored: training mean >= threshold
    threshold: float
    train: np.ndarray  # (training spots in SpotSet order, len(genes)), float32
    truth: dict[str, np.ndarray]  # test sample -> (spots, len(scored))


def _expression(adata, genes: Sequence[str], transform: str) -> np.ndarray:
    matrix = transform_counts(adata.X, transform)  # library size over all genes of the spot
    columns = adata.var_names.get_indexer(list(genes))
    return np.asarray(matrix[:, columns].todense(), dtype=np.float32)


def build_transcriptome(
    samples: Mapping[str, object],
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    train_spots: SpotSet,
    transform: str,
    threshold: float,
) -> TranscriptomeTargets:
    """Genes and matrices for whole-transcriptome scoring; gene choice uses training samples only.

    ``samples`` maps sample id -> :class:`~he2st.data.sample.Sample`; ``train_spots`` fixes the row
    order (sample by sample, spots in each sample's order, as :func:`~he2st.data.spots.load_spots`).
    """
    genes_sets = [set(samples[s].adata.var_names) for s in train_ids]
    first = samples[train_ids[0]].adata.var_names
    genes = [g for g in first if all(g in s for s in genes_sets[1:])]
    parts = []
    for sid in train_ids:
        adata = samples[sid].adata
        rows = np.asarray(train_spots.barcodes[train_spots.sample_ids == sid])
        if list(rows) != list(adata.obs_names):
            raise He2stError(f"training spots of {sid} are not in the sample's order")
        parts.append(_expression(adata, genes, transform))
    train = np.concatenate(parts)
    means = train.mean(axis=0)
    scored = [g for g, m in zip(genes, means, strict=True) if m >= threshold]
    if not scored:
        raise He2stError(f"no gene has mean training expression >= {threshold}; lower the threshold")
    truth = {}
    for sid in test_ids:
        adata = samples[sid].adata
        missing = [g for g in scored if g not in adata.var_names]
        present = [g for g in scored if g in adata.var_names]
        values = np.zeros((adata.n_obs, len(scored)), np.float32)
        if present:
            values[:, [scored.index(g) for g in present]] = _expression(adata, present, transform)
        if missing and len(missing) == len(scored):
            raise He2stError(f"test sample {sid} measures none of the scored genes")
        truth[sid] = values  # a gene the test sample did not measure counts as 0 (not detected)
    return TranscriptomeTargets(genes, scored, threshold, train, truth)


def transcriptome_scores(
    predictions: Mapping[str, np.ndarray], genes: Sequence[str], targets: TranscriptomeTargets
) -> dict[str, float]:
    """Fold-level scores of whole-transcriptome predictions (mean over test samples of the per-sample
    mean / median Pearson over scored genes; genes constant in a sample are skipped and counted)."""
    position = {g: i for i, g in enumerate(genes)}
    idx = np.array([position[g] for g in targets.scored])
    means, medians, skipped = [], [], []
    for sid, truth in targets.truth.items():
        r = pearson_per_gene(predictions[sid][:, idx], truth)
        means.append(float(np.nanmean(r)))
        medians.append(float(np.nanmedian(r)))
        skipped.append(int(np.isnan(r).sum()))
    return {
        "transcriptome_pearson_mean": float(np.mean(means)),
        "transcriptome_pearson_median": float(np.mean(medians)),
        "transcriptome_genes_predicted": float(len(genes)),
        "transcriptome_genes_scored": float(len(targets.scored)),
        "transcriptome_genes_constant": float(np.mean(skipped)),
        "transcriptome_threshold": float(targets.threshold),
    }


def celltype_scores(
    predictions: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], types: Sequence[str]
) -> dict[str, float]:
    """Per-type Pearson of predicted vs deconvolved proportions, averaged over test samples, and their
    mean over types (``celltype_pearson_mean``)."""
    per_type = np.mean([pearson_per_gene(predictions[s], truth[s]) for s in truth], axis=0)
    scores = {f"celltype_pearson/{t}": float(r) for t, r in zip(types, per_type, strict=True)}
    scores["celltype_pearson_mean"] = float(np.nanmean(per_type))
    return scores
