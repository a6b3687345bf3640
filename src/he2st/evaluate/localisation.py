"""Cancer localisation: a biomarker score per spot, and how well it separates cancer from other tissue.

**Score.** Per spot, the weighted mean of the signature's genes, each z-scored across the spots of the
section itself (within-section statistics, so the score needs nothing but the section: ``he2st
localize`` and the benchmark compute the same number, and a new slide is scored as a held-out one is).
Values are on a log scale -- the panel's transform for predictions and targets; counts are turned into
log1p CP10k first. A gene constant over the section contributes zero; a gene measured twice is left out.

**Labels.** Pathologist regions in ``obs["region"]`` (her2st): cancer is ``invasive cancer`` and
``cancer in situ``; every other label is non-cancer tissue, except ``undetermined`` and ``unlabelled``,
which are not scored. A section is scored when it has spots of both kinds.

**Benchmark.** Per fold, for each held-out sample with labels: AUROC and average precision (AP) of the
score from predicted expression, beside the same from its measured expression on the same genes (the
reference: what the signature achieves on the counts; a prediction, smoother than single-spot counts, can
exceed it) and from an image-only probe (the floor:
standard scaling, PCA to 256 dimensions as HEST's probe, then logistic regression with C = 1, fitted on
the labelled spots of the fold's training samples only). ``cancer_share`` is the share of cancer spots,
the AP of a random score. A fold's value is the mean over its scored samples. Test labels and measured
expression are read for scoring only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.evaluate.hest_probe import HEST_LATENT_DIM
from he2st.evaluate.tls import TlsModel, TlsScore, model_columns, packaged_signature

__all__ = ["LocalisationFold", "build_localisation_fold", "cancer_labels", "fold_signature", "read_signature",
           "separation", "signature_score", "youden_threshold"]

REGION_KEY = "region"
CANCER_REGIONS = ("invasive cancer", "cancer in situ")
UNSCORED_REGIONS = ("undetermined", "unlabelled")
WHAT = "localisation signature"
#: biomarker signatures shipped with he2st (``signatures/<name>.tsv``, unit weights) and their sources
SIGNATURE_SOURCES = {
    "breast-her2": "HER2+ breast cancer: ERBB2 and its 17q12 amplicon (GRB7, PGAP3, STARD3, TCAP, PNMT, MIEN1; "
                   "Kauraniemi & Kallioniemi 2006, Endocr Relat Cancer 13:39; Staaf et al. 2010, Breast Cancer "
                   "Res 12:R25) with the epithelial EPCAM, KRT8, KRT18, KRT19 (Moll et al. 1982, Cell 31:11; "
                   "Went et al. 2004, Hum Pathol 35:122)",
}
#: registered dataset -> the signature its benchmarks score by default
DATASET_SIGNATURES = {"her2st": "breast-her2"}


def read_signature(signature: str | Path) -> TlsModel:
    """A shipped signature by name (``SIGNATURE_SOURCES``) or a gene,weight table file."""
    if str(signature) in SIGNATURE_SOURCES:
        return TlsModel.read(packaged_signature(str(signature)), WHAT)
    if not Path(signature).exists() and "/" not in str(signature) and "." not in str(signature):
        raise He2stError(f"unknown {WHAT} {str(signature)!r}; named ones: {', '.join(SIGNATURE_SOURCES)}, "
                         "or give a gene,weight table file")
    return TlsModel.read(signature, WHAT)


def fold_signature(configured: str | None, datasets: Iterable[str | None]) -> str | None:
    """The signature a fold scores: the configured one, else the default of its samples' one dataset."""
    if configured is not None:
        return configured
    names = set(datasets)
    return DATASET_SIGNATURES.get(next(iter(names))) if len(names) == 1 else None


def signature_score(values: np.ndarray | sp.spmatrix, genes: Sequence[str], signature: TlsModel) -> TlsScore:
    """Per-spot score of log-scale ``values`` (spots x ``genes``), see the module docstring."""
    present, columns = model_columns(list(genes), signature, WHAT)
    block = values[:, columns]
    block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
    weights = signature.weights[present].to_numpy()
    score = StandardScaler().fit_transform(block) @ weights / np.abs(weights).sum()
    return TlsScore(score, present, float(np.abs(weights).sum() / np.abs(signature.weights).sum()))


def cancer_labels(obs: pd.DataFrame, spots: Sequence[str]) -> np.ndarray | None:
    """Per spot of ``spots``: 1 cancer, 0 other labelled tissue, -1 not scored (a missing or empty label
    too); None without a region column."""
    if REGION_KEY not in obs:
        return None
    raw = obs[REGION_KEY].reindex(list(spots))
    region = raw.astype(str).str.strip().str.lower()
    labels = np.where(region.isin(CANCER_REGIONS), 1, 0)
    labels[(raw.isna() | region.isin(UNSCORED_REGIONS) | (region == "")).to_numpy()] = -1
    return labels


def scorable(labels: np.ndarray | None) -> bool:
    """Whether a section has both cancer and other labelled spots (AUROC and AP need both)."""
    return labels is not None and bool((labels == 1).any() and (labels == 0).any())


def separation(score: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC and average precision of ``score`` for cancer among the labelled spots, and the cancer share."""
    keep = labels >= 0
    truth, score = labels[keep], np.asarray(score, dtype=np.float64)[keep]
    return {"auroc": float(roc_auc_score(truth, score)), "ap": float(average_precision_score(truth, score)),
            "cancer_share": float(truth.mean())}


def youden_threshold(score: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold with the largest sensitivity + specificity - 1 on the labelled spots."""
    keep = labels >= 0
    fpr, tpr, thresholds = roc_curve(labels[keep], np.asarray(score, dtype=np.float64)[keep])
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], np.asarray(score)[keep].max()))  # roc_curve's first threshold is +inf


@dataclass
class LocalisationFold:
    """What a fold needs to score localisation: the signature, the labels of its scorable test samples
    (in their spot order) and the method-independent scores (measured reference, image floor) per sample."""

    name: str
    signature: TlsModel
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        return "; ".join(self.notes)

    def score(self, predictions: Mapping[str, np.ndarray], genes: Sequence[str]) -> dict[str, dict[str, float]]:
        """``{signature: {metric: fold value}}`` of one method's test predictions (panel scale), {} when no
        test sample could be scored."""
        if not self.labels:
            return {}
        per_sample = []
        for sid, labels in self.labels.items():
            predicted = separation(signature_score(predictions[sid], genes, self.signature).score, labels)
            per_sample.append({"auroc": predicted["auroc"], "ap": predicted["ap"]} | self.baseline[sid])
        return {self.name: {f"localisation_{k}": float(np.mean([s[k] for s in per_sample])) for k in per_sample[0]}}


def _fit_probe(train: SpotSet, samples: Mapping[str, Any]) -> tuple[Any, str]:
    """The image-only probe on the training samples' labelled spots, or None and why it was not fitted."""
    labels = np.full(len(train), -1)
    for sid in dict.fromkeys(train.sample_ids):
        found = cancer_labels(samples[sid].adata.obs, train.barcodes[train.sample_ids == sid])
        if found is not None:
            labels[train.sample_ids == sid] = found
    keep = labels >= 0
    if not scorable(labels):
        return None, "image probe not fitted: the training samples have no labelled spots of both kinds"
    fitted_on = sorted(set(train.sample_ids[keep]))
    probe = make_pipeline(StandardScaler(), PCA(min(HEST_LATENT_DIM, int(keep.sum()), train.features.shape[1]),
                                                svd_solver="full"), LogisticRegression(max_iter=2000))
    probe.fit(train.features[keep], labels[keep])
    return probe, f"image probe fitted on {int(keep.sum())} labelled training spots of {', '.join(fitted_on)}"


def build_localisation_fold(name: str, signature: TlsModel, samples: Mapping[str, Any], train: SpotSet,
                            test: SpotSet, truth: Mapping[str, np.ndarray],
                            genes: Sequence[str]) -> LocalisationFold | None:
    """The fold's labels, measured reference and image floor; None when no test sample carries labels.

    ``samples`` maps sample id -> :class:`~he2st.data.sample.Sample` (training and test); ``train`` and
    ``test`` are the fold's training spots and test inputs, ``truth`` the test samples' measured panel
    targets and ``genes`` the panel. Test labels and expression are read for scoring only."""
    name = name if name in SIGNATURE_SOURCES else Path(name).stem  # a file's signature goes by its file name
    test_ids = list(dict.fromkeys(test.sample_ids))
    labels = {s: cancer_labels(samples[s].adata.obs, test.barcodes[test.sample_ids == s]) for s in test_ids}
    if all(v is None for v in labels.values()):
        return None
    fold = LocalisationFold(name, signature)
    try:
        present = model_columns(list(genes), signature, WHAT)[0]
    except He2stError:
        fold.notes.append(f"no gene of signature {name} is in the fold's panel: not scored")
        return fold
    fold.notes.append(f"signature {name}: {len(present)} of {len(signature.weights)} genes in the fold's panel "
                      f"({', '.join(present)})")
    skipped = [s for s, v in labels.items() if v is not None and not scorable(v)]
    if skipped:
        # the labels are her2st's words: a study that says "tumor" must see why none of its spots counted
        found = sorted({str(v).strip().lower() for s in skipped for v in samples[s].adata.obs[REGION_KEY].dropna()})
        fold.notes.append(f"not scored (no spots of both cancer, obs['{REGION_KEY}'] {' or '.join(CANCER_REGIONS)}, "
                          f"and other labelled tissue; labels found: {', '.join(found[:8]) or 'none'}"
                          f"{', ...' if len(found) > 8 else ''}): {', '.join(skipped)}")
    fold.labels = {s: v for s, v in labels.items() if scorable(v)}
    if not fold.labels:
        return fold
    probe, note = _fit_probe(train, samples)
    fold.notes.append(note)
    for sid, y in fold.labels.items():
        measured = separation(signature_score(truth[sid], genes, signature).score, y)
        baseline = {"auroc_measured": measured["auroc"], "ap_measured": measured["ap"]}
        if probe is not None:
            image = separation(probe.predict_proba(test.features[test.sample_ids == sid])[:, 1], y)
            baseline |= {"auroc_image": image["auroc"], "ap_image": image["ap"]}
        fold.baseline[sid] = baseline | {"cancer_share": measured["cancer_share"]}
    return fold
