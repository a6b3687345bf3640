"""``he2st localize``: cancer spots of a prediction (or a measured sample) from a biomarker signature.

The per-spot score is the benchmark's (:func:`~he2st.evaluate.localisation.signature_score`: the weighted
mean of the signature's genes, each z-scored within the section). A model card holds no labelled training
spots, so the call threshold follows ``he2st tls``'s rule: as given; else from measured training sections
(``threshold_from``) -- the threshold with the best sensitivity + specificity on their pathologist region
labels when they carry them, otherwise the ``quantile`` of their pooled scores; else the ``quantile`` of
the section's own scores, which assumes a share of cancer and is said so in the output. A prediction is
refused with ``he2st tls``'s rules (:func:`~he2st.workflows.tls.refusal`) unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from he2st.data.genes import transform_counts
from he2st.data.sample import Sample
from he2st.errors import He2stError
from he2st.evaluate.localisation import (
    cancer_labels,
    read_signature,
    scorable,
    separation,
    signature_score,
    youden_threshold,
)
from he2st.evaluate.tls import TlsModel, TlsScore
from he2st.io import check_finite, write_text_atomic
from he2st.workflows.tls import choose_threshold, measured_spots, scored_for_calls

DEFAULT_SIGNATURE = "breast-her2"


@dataclass
class LocalizeResult:
    adata: ad.AnnData  # the input with obs cancer_score / cancer_call
    path: Path  # the table: spot, x, y, cancer_score, cancer_call
    info: dict[str, Any]  # signature, genes used, threshold and its source, calls, why it would be refused
    agreement: dict[str, float] | None  # against a measured sample, when given


def section_score(adata: ad.AnnData, signature: TlsModel, where: Path) -> TlsScore:
    """Score a prediction on its own (log) scale, or a he2st sample's counts as log1p CP10k."""
    check_finite(adata.X, "its expression matrix (X)", where)
    values = adata.X if "target_transform" in dict(adata.uns.get("he2st", {})) else transform_counts(
        adata.X, "log1p_cp10k")
    try:
        return signature_score(values, list(adata.var_names), signature)
    except He2stError as exc:
        raise He2stError(exc.problem, where) from exc


def _threshold(scored: TlsScore, signature: TlsModel, threshold: float | None, quantile: float,
               threshold_from: list[Path] | None) -> tuple[float, str]:
    """The call threshold and its source (module docstring); reference sections are scored on the genes
    this input has, so the two score scales agree."""
    if threshold is not None or not threshold_from:
        return choose_threshold(scored.score, threshold, quantile)
    same_genes = signature.restricted(scored.genes)
    scores, labels = [], []
    for path in threshold_from:
        adata = Sample.load(path).adata
        scores.append(section_score(adata, same_genes, path).score)
        found = cancer_labels(adata.obs, adata.obs_names)
        labels.append(np.full(adata.n_obs, -1) if found is None else found)
    pooled, pooled_labels = np.concatenate(scores), np.concatenate(labels)
    if scorable(pooled_labels):
        return youden_threshold(pooled, pooled_labels), "training sections' region labels (Youden's J)"
    return choose_threshold(scored.score, None, quantile, pooled)


def localize(path: Path, out: Path, signature: str | Path = DEFAULT_SIGNATURE, threshold: float | None = None,
             quantile: float = 0.5, threshold_from: list[Path] | None = None, sample: Path | None = None,
             force: bool = False) -> LocalizeResult:
    """Score ``path``, call spots at the threshold and write ``<out>/<name>.localize.csv``; with ``sample``
    also compare with its measured score and, where it has region labels, with them (AUROC, AP).

    A prediction is refused (one line, naming what is missing) when it holds too little of the signature or
    its model cannot predict the signature's genes on a new patient; ``force`` calls it anyway, so noted."""
    model = read_signature(signature)
    calls = scored_for_calls(path, out / f"{path.stem}.localize.csv", model, str(signature), section_score,
                             "cancer", quantile, force, threshold)
    adata, target, scored, reason = calls.adata, calls.target, calls.scored, calls.reason
    threshold, source = _threshold(scored, model, threshold, quantile, threshold_from)
    adata.obs["cancer_score"] = scored.score.astype(np.float32)
    adata.obs["cancer_call"] = scored.score >= threshold
    info = {"signature": str(signature), "genes": list(scored.genes), "weight_coverage": scored.weight_coverage,
            "threshold": threshold, "threshold_source": source, "n_called": int(adata.obs["cancer_call"].sum()),
            "refused_without_force": reason}
    agreement = None
    if sample is not None:
        measured, shared = measured_spots(adata, path, sample)
        predicted = scored.score[adata.obs_names.get_indexer(shared)]
        truth = section_score(measured.adata[shared], model.restricted(scored.genes), sample).score
        agreement = {"pearson": float(np.corrcoef(predicted, truth)[0, 1])}
        labels = cancer_labels(measured.adata.obs, shared)
        if scorable(labels):
            agreement |= separation(predicted, labels)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    table = pd.DataFrame({"spot": adata.obs_names, "x": xy[:, 0], "y": xy[:, 1],
                          "cancer_score": adata.obs["cancer_score"], "cancer_call": adata.obs["cancer_call"]})
    write_text_atomic(target, table.to_csv(index=False))
    return LocalizeResult(adata, target, info, agreement)
