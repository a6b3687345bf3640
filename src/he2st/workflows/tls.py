"""``he2st tls``: TLS scores, calls and regions for a prediction (or a measured sample) file.

The threshold that turns scores into calls is chosen on training data when given (``threshold_from``:
measured sections of training patients, the ``quantile`` of their pooled scores), else on the section
itself (its own ``quantile``, said so in the output), or set as a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
from scipy.spatial import cKDTree

from he2st.data.registry import dataset_dir
from he2st.data.sample import Sample
from he2st.errors import He2stError
from he2st.evaluate.tls import (
    HER2ST_MODEL,
    HER2ST_SIGNATURE,
    TlsModel,
    TlsScore,
    tls_agreement,
    tls_regions,
    tls_score,
)
from he2st.io import atomic_path, check_finite, check_output, read_h5ad_checked


@dataclass
class TlsResult:
    adata: ad.AnnData  # the input with obs tls_score / tls_call / tls_region and uns["he2st_tls"]
    path: Path
    threshold_source: str
    agreement: dict[str, float] | None  # against a measured sample, when given


SHIPPED_MODELS = {"her2st": HER2ST_MODEL, "her2st-signature": HER2ST_SIGNATURE}


def read_model(model: str | Path) -> TlsModel:
    """``her2st`` (the published model shipped with the her2st dataset), ``her2st-signature`` (its
    172-gene signature) or a weighted gene list file."""
    shipped = SHIPPED_MODELS.get(str(model))
    return TlsModel.read(dataset_dir("her2st") / shipped if shipped is not None else model)


def section_score(adata: ad.AnnData, model: TlsModel, where: Path) -> TlsScore:
    """Score a prediction (its target scale) or a he2st sample (raw counts)."""
    check_finite(adata.X, "its expression matrix (X)", where)
    meta = dict(adata.uns.get("he2st", {}))
    scale = str(meta["target_transform"]) if "target_transform" in meta else "counts"
    try:
        return tls_score(adata.X, list(adata.var_names), model, scale)
    except He2stError as exc:
        raise He2stError(exc.problem, where) from exc


def detect_tls(path: Path, out: Path, model: str | Path = "her2st", threshold: float | None = None,
               quantile: float = 0.9, threshold_from: list[Path] | None = None,
               sample: Path | None = None) -> TlsResult:
    """Score ``path``, call spots at the threshold, join called neighbours into regions, write the result
    as ``<out>/<name>.tls.h5ad``; with ``sample`` also compare with its measured TLS score."""
    if not 0 < quantile < 1:
        raise He2stError(f"quantile must lie between 0 and 1, got {quantile}")
    adata = read_h5ad_checked(path, "input")
    target = out / f"{path.stem}.tls.h5ad"
    check_output(target)  # before any work; the map (.tls.png) beside it too
    check_output(target.with_suffix(".png"))
    tls = read_model(model)
    scored = section_score(adata, tls, path)
    if threshold is not None:
        source = "given"
    elif threshold_from:  # scored on the genes this input has, so the two score scales agree
        same_genes = tls.restricted(scored.genes)
        pooled = np.concatenate([section_score(Sample.load(p).adata, same_genes, p).score for p in threshold_from])
        threshold, source = float(np.quantile(pooled, quantile)), f"training sections ({quantile:g} quantile)"
    else:
        threshold, source = float(np.quantile(scored.score, quantile)), f"this section ({quantile:g} quantile)"
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
    }
    agreement = None
    if sample is not None:
        measured = Sample.load(sample)
        shared = adata.obs_names.intersection(measured.adata.obs_names)
        if len(shared) < 10:
            raise He2stError(f"fewer than 10 spots of {path.name} are spots of sample {measured.sample_id}; "
                             "predict at its spots (--spots-from) to compare", sample)
        truth = section_score(measured.adata[shared], tls, sample).score
        agreement = tls_agreement(scored.score[adata.obs_names.get_indexer(shared)], truth)
        adata.uns["he2st_tls"] |= {f"measured_{k}": v for k, v in agreement.items()}
    with atomic_path(target, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return TlsResult(adata, target, source, agreement)
