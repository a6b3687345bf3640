"""``he2st tls``: TLS scores, calls and regions for a prediction (or a measured sample) file.

The threshold that turns scores into calls is set as a number, or chosen on training data: for a
prediction whose model measured the signature on its held-out training patients, the threshold it set there
(with the precision those calls had); else, with ``threshold_from``, the ``quantile`` of measured training
sections' pooled scores; else the section's own ``quantile``, said so in the output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from he2st.data.datasets import dataset_dir
from he2st.data.sample import Sample
from he2st.errors import He2stError
from he2st.evaluate.tls import (
    HER2ST_MODEL,
    HER2ST_SIGNATURE,
    MIN_WEIGHT_COVERAGE,
    PACKAGED_SIGNATURES,
    SIGNATURE_SOURCES,
    TlsModel,
    TlsScore,
    gene_symbols,
    packaged_signature,
    tls_agreement,
    tls_regions,
    tls_score,
)
from he2st.io import atomic_path, check_finite, check_output, read_spots_h5ad


@dataclass
class TlsResult:
    adata: ad.AnnData  # the input with obs tls_score / tls_call / tls_region and uns["he2st_tls"]
    path: Path
    threshold_source: str
    agreement: dict[str, float] | None  # against a measured sample, when given


SHIPPED_MODELS = {"her2st": HER2ST_MODEL, "her2st-signature": HER2ST_SIGNATURE}  # in the her2st dataset folder
MIN_EXPECTED_R = 0.1  # lower bound of the signature genes' expected r (weighted) below which calls are refused


def read_model(model: str | Path) -> TlsModel:
    """A named TLS model (``SIGNATURE_SOURCES``; the her2st ones need its dataset) or a weighted gene list file."""
    shipped = SHIPPED_MODELS.get(str(model))
    if shipped is not None:
        return TlsModel.read(dataset_dir("her2st") / shipped)
    if str(model) in PACKAGED_SIGNATURES:
        return TlsModel.read(packaged_signature(str(model)))
    if not Path(model).exists() and "/" not in str(model) and "." not in str(model):
        raise He2stError(f"unknown TLS signature {str(model)!r}; named ones: {', '.join(SIGNATURE_SOURCES)}, "
                         "or give a gene,weight table file")
    return TlsModel.read(model)


def measured_score(adata: ad.AnnData, scored: TlsScore, name: str) -> dict[str, float]:
    """What the prediction's model measured of this signature's score on held-out training patients (expected
    r, its bound, call threshold and precision), when it scored the same genes; else {}. (A card that lists
    only how many genes it scored is matched by that number.)"""
    card = dict(adata.uns.get("he2st", {})).get("card")
    if not card:
        return {}
    entry = json.loads(str(card)).get("reliability", {}).get("scores", {}).get(name, {})
    if "genes" in entry:
        return entry if set(entry["genes"]) == set(scored.genes) else {}
    return entry if entry.get("genes_used") == scored.genes_used else {}


def refusal(adata: ad.AnnData, scored: TlsScore, model: TlsModel, name: str) -> str:
    """Why spots of this prediction should not be called with this signature ('' when they may be): too little
    of the signature's weight predicted, or the signature not predictable by the model on a new patient --
    judged on the score itself where the model measured it, else on its genes one by one."""
    if scored.weight_coverage < MIN_WEIGHT_COVERAGE:
        missing = [g for g in model.weights.abs().sort_values(ascending=False).index if g not in scored.genes][:8]
        return (f"the prediction holds {scored.weight_coverage:.0%} of signature {name}'s weight "
                f"({scored.genes_used} of {len(model.weights)} genes; missing e.g. {', '.join(missing)}); predict "
                "its genes with a retrieval model trained with a transcriptome bank (`he2st train --method knn --set "
                "transcriptome_threshold=0`, then `he2st predict --transcriptome`)")
    measured = measured_score(adata, scored, name)
    if measured:
        if not measured["expected_r_low"] >= MIN_EXPECTED_R:  # NaN: not measurable on the held-out patients
            return (f"signature {name}'s score is not predictable enough by this model on a new patient (90% lower "
                    f"bound of its expected r {measured['expected_r_low']:.3f} < {MIN_EXPECTED_R}, measured on "
                    "held-out training patients); see `he2st card`")
        return ""
    if "expected_r_low" in adata.var:
        symbols = gene_symbols(adata.var_names)
        low = pd.Series(np.asarray(adata.var["expected_r_low"], float), index=symbols)
        low = low[~low.index.duplicated()].reindex(scored.genes)
        if low.notna().any():
            weights = model.weights[scored.genes].abs()
            bound = float((weights * low.fillna(0.0).clip(lower=0.0)).sum() / weights.sum())
            if bound < MIN_EXPECTED_R:
                return (f"the model's genes of signature {name} are not predictable enough on a new patient "
                        f"(weighted 90% lower bound of their expected r {bound:.3f} < {MIN_EXPECTED_R}); "
                        "see `he2st card` for what this model predicts")
    return ""


def choose_threshold(score: np.ndarray, threshold: float | None, quantile: float,
                     reference: np.ndarray | None = None) -> tuple[float, str]:
    """The call threshold and where it came from: as given, else the ``quantile`` of the reference scores
    (measured training sections), else of this section's own scores."""
    if threshold is not None:
        return float(threshold), "given"
    if reference is not None:
        return float(np.quantile(reference, quantile)), f"training sections ({quantile:g} quantile)"
    return float(np.quantile(score, quantile)), f"this section ({quantile:g} quantile)"


def measured_spots(adata: ad.AnnData, path: Path, sample: Path) -> tuple[Sample, pd.Index]:
    """The measured sample to compare ``adata`` (read from ``path``) with, and the spots they share;
    refused in one line when they share fewer than 10."""
    measured = Sample.load(sample)
    shared = adata.obs_names.intersection(measured.adata.obs_names)
    if len(shared) < 10:
        raise He2stError(f"fewer than 10 spots of {path.name} are spots of sample {measured.sample_id}; "
                         "predict at its spots (--spots-from) to compare", sample)
    return measured, shared


def section_score(adata: ad.AnnData, model: TlsModel, where: Path) -> TlsScore:
    """Score a prediction (its target scale) or a he2st sample (raw counts)."""
    check_finite(adata.X, "its expression matrix (X)", where)
    meta = dict(adata.uns.get("he2st", {}))
    scale = str(meta["target_transform"]) if "target_transform" in meta else "counts"
    try:
        return tls_score(adata.X, list(adata.var_names), model, scale)
    except He2stError as exc:
        raise He2stError(exc.problem, where) from exc


@dataclass
class CallInput:
    """A prediction (or measured sample) read and scored for calls, before any threshold."""

    adata: ad.AnnData
    target: Path  # the output file (checked writable, with its .png map beside it)
    scored: TlsScore
    is_prediction: bool
    reason: str  # why a prediction should not be called ('' when it may be)


def scored_for_calls(path: Path, target: Path, signature: TlsModel, name: str,
                     score: Callable[[ad.AnnData, TlsModel, Path], TlsScore], calls: str, quantile: float,
                     force: bool, threshold: float | None = None) -> CallInput:
    """Read and score ``path`` for ``he2st tls`` or ``he2st localize``, once its outputs are known to be
    writable; a prediction that cannot support the calls is refused in one line unless ``force``."""
    if not 0 < quantile < 1:
        raise He2stError(f"quantile must lie between 0 and 1, got {quantile}")
    if threshold is not None and not math.isfinite(threshold):
        raise He2stError(f"threshold must be a finite number, got {threshold}")
    adata = read_spots_h5ad(path, "input")
    check_output(target)  # before any work; the map (.png) beside it too
    check_output(target.with_suffix(".png"))
    scored = score(adata, signature, path)
    is_prediction = "target_transform" in dict(adata.uns.get("he2st", {}))
    reason = refusal(adata, scored, signature, name) if is_prediction else ""
    if reason and not force:
        raise He2stError(f"no {calls} calls: {reason}; or pass --force", path)
    return CallInput(adata, target, scored, is_prediction, reason)


def detect_tls(path: Path, out: Path, model: str | Path = "her2st", threshold: float | None = None,
               quantile: float = 0.9, threshold_from: list[Path] | None = None,
               sample: Path | None = None, force: bool = False) -> TlsResult:
    """Score ``path``, call spots at the threshold, join called neighbours into regions, write the result
    as ``<out>/<name>.tls.h5ad``; with ``sample`` also compare with its measured TLS score.

    A prediction is refused (one line, naming what is missing) when it holds too little of the signature or
    its model cannot predict the signature's genes on a new patient; ``force`` calls it anyway, so noted."""
    tls = read_model(model)
    calls = scored_for_calls(path, out / f"{path.stem}.tls.h5ad", tls, str(model), section_score, "TLS", quantile,
                             force, threshold)
    adata, target, scored, is_prediction, reason = (calls.adata, calls.target, calls.scored, calls.is_prediction,
                                                    calls.reason)
    trained = measured_score(adata, scored, str(model)) if is_prediction else {}
    pooled = None
    if threshold is None and threshold_from:  # scored on the genes this input has, so the two score scales agree
        same_genes = tls.restricted(scored.genes)
        pooled = np.concatenate([section_score(Sample.load(p).adata, same_genes, p).score for p in threshold_from])
    if threshold is None and trained and not threshold_from:
        threshold = trained["threshold"]
        source = (f"held-out training patients (there {1 - trained['precision']:.0%} of calls fell outside a "
                  f"section's top tenth of measured scores: precision {trained['precision']:.2f}, "
                  f"recall {trained['recall']:.2f})")
    else:
        threshold, source = choose_threshold(scored.score, threshold, quantile, pooled)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    spacing = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) if len(xy) > 1 else 1.0
    regions = tls_regions(scored.score, xy, threshold, 1.5 * spacing)  # spot neighbours join, gaps do not
    adata.obs["tls_score"] = scored.score.astype(np.float32)
    adata.obs["tls_call"] = scored.score >= threshold
    adata.obs["tls_region"] = regions
    adata.uns["he2st_tls"] = {
        "model": str(model), "threshold": float(threshold), "threshold_source": source,
        "genes_used": int(scored.genes_used), "weight_coverage": float(scored.weight_coverage),
        "n_called": int((regions >= 0).sum()), "n_regions": int(regions.max() + 1),
        "refused_without_force": reason,
    }
    agreement = None
    if sample is not None:
        measured, shared = measured_spots(adata, path, sample)
        truth = section_score(measured.adata[shared], tls, sample).score
        agreement = tls_agreement(scored.score[adata.obs_names.get_indexer(shared)], truth, threshold=threshold)
        adata.uns["he2st_tls"] |= {f"measured_{k}": v for k, v in agreement.items()}
    with atomic_path(target, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return TlsResult(adata, target, source, agreement)
