"""Tertiary lymphoid structures (TLS) from expression: a per-spot score, calls and regions.

The score follows her2st's published TLS model (Andersson et al. 2021, ``res/TLS-pred``; the authors'
``scripts/predict.py``): each spot's expression as relative abundance (counts / spot total), each gene
divided by its standard deviation across the spots of the section, then a weighted sum with the
model's coefficients plus its intercept. Any weighted gene list works the same way (e.g. a chemokine
TLS signature for other cancers). Predictions on the log1p CP10k scale are turned back into relative
abundance first (``expm1 / 1e4``), so predicted and measured sections are scored alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from sklearn.metrics import roc_auc_score

from he2st.errors import He2stError
from he2st.io import table_path

HER2ST_MODEL = Path("res") / "TLS-pred" / "coef-full.tsv.gz"  # inside the her2st dataset folder
HER2ST_SIGNATURE = Path("res") / "TLS-pred" / "tls-signature.tsv.gz"  # its 172-gene signature, same folder
#: published TLS gene lists shipped with he2st (``signatures/<name>.tsv``, unit weights), scored by the rule above
PACKAGED_SIGNATURES = ("chemokine-12", "melanoma-cabrita")
#: share of a signature's |weight| the data must hold before its score stands for the signature: below it a few
#: genes that happen to share a name (another tissue's panel, another species' symbols upper-cased) would be
#: reported as the model's TLS score
MIN_WEIGHT_COVERAGE = 0.5
SIGNATURE_SOURCES = {
    "her2st": "Andersson et al. 2021, Nat Commun 12:6012 -- her2st's TLS model (breast; needs the her2st dataset)",
    "her2st-signature": "Andersson et al. 2021 -- the 172-gene signature of that model (breast; her2st dataset)",
    "chemokine-12": "Coppola et al. 2011, Am J Pathol 179:37; Messina et al. 2012, Sci Rep 2:765 -- 12 chemokines "
                    "(CCL2-5, 8, 18, 19, 21, CXCL9-11, 13; colorectal cancer, melanoma and others)",
    "melanoma-cabrita": "Cabrita et al. 2020, Nature 577:561 -- 9-gene TLS signature (melanoma)",
}


def packaged_signature(name: str) -> Path:
    """The file of a TLS signature shipped with he2st."""
    return Path(str(resources.files("he2st.evaluate") / "signatures" / f"{name}.tsv"))


def gene_symbols(names) -> pd.Index:
    """Gene names as TLS models key them: upper case, spaces removed (files and AnnData spell symbols
    differently, and every comparison with a model's genes goes through this one spelling)."""
    return pd.Index([str(g).upper().replace(" ", "") for g in names])


@dataclass(frozen=True)
class TlsModel:
    """Gene weights (upper-case symbols) and an intercept."""

    weights: pd.Series
    intercept: float = 0.0

    def restricted(self, genes: pd.Index) -> TlsModel:
        """The model on ``genes`` only: scores of sections with other gene sets become comparable."""
        return TlsModel(self.weights[self.weights.index.intersection(genes)], self.intercept)

    @classmethod
    def read(cls, path: str | Path, what: str = "TLS model") -> TlsModel:
        """A two-column table (gene, weight; tab- or comma-separated, one header row); a row named
        ``intercept`` is the intercept. ``what`` names the file in error lines."""
        path = table_path(path, f"{what} file")
        try:
            table = pd.read_csv(path, sep=None, engine="python", index_col=0)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise He2stError(f"cannot parse the {what} ({exc})", path) from exc
        if table.shape[1] < 1 or not pd.api.types.is_numeric_dtype(table.iloc[:, 0]):
            raise He2stError(f"a {what} needs a numeric weight column after the gene column", path)
        weights = table.iloc[:, 0].astype(float)
        weights.index = gene_symbols(weights.index)
        intercept = float(weights.pop("INTERCEPT")) if "INTERCEPT" in weights.index else 0.0
        weights = weights[weights != 0]
        if weights.index.has_duplicates:
            weights = weights.groupby(level=0).sum()
        return cls(weights, intercept)


@dataclass(frozen=True)
class TlsScore:
    score: np.ndarray  # per spot
    genes: pd.Index  # the model's genes present in the data (upper case)
    weight_coverage: float  # share of the model's total |weight| on genes present in the data

    @property
    def genes_used(self) -> int:
        return len(self.genes)


def relative_abundance(values: np.ndarray | sp.spmatrix, scale: str) -> np.ndarray:
    """Per-spot relative abundance from raw ``counts`` (divided by the spot total over all genes given)
    or from ``log1p_cp10k`` values (``expm1 / 1e4``)."""
    dense = np.asarray(values.toarray() if sp.issparse(values) else values, dtype=np.float64)
    if scale == "counts":
        total = dense.sum(axis=1, keepdims=True)
        return np.divide(dense, total, out=np.zeros_like(dense), where=total > 0)
    if scale == "log1p_cp10k":
        return np.expm1(dense) / 1e4
    raise He2stError(f"TLS scores need counts or log1p_cp10k values, got {scale!r}")


def model_columns(genes: list[str], model: TlsModel, what: str = "TLS model") -> tuple[pd.Index, np.ndarray]:
    """The model's genes (upper case) measured exactly once among ``genes``, and their columns; a gene
    measured twice is left out rather than guessed."""
    names = gene_symbols(genes)
    unique = ~names.duplicated(keep=False)
    present = model.weights.index.intersection(names[unique])
    if len(present) == 0:
        raise He2stError(f"none of the {what}'s genes is in the data")
    return present, pd.Series(np.flatnonzero(unique), index=names[unique])[present].to_numpy()


def tls_score(values: np.ndarray | sp.spmatrix, genes: list[str], model: TlsModel, scale: str) -> TlsScore:
    """The section's per-spot TLS score (see the module docstring)."""
    abundance = relative_abundance(values, scale)
    present, columns = model_columns(genes, model)
    block = abundance[:, columns]
    std = block.std(axis=0)
    scaled = np.divide(block, std, out=np.zeros_like(block), where=std > 0)
    weights = model.weights[present].to_numpy()
    coverage = float(np.abs(weights).sum() / np.abs(model.weights).sum())
    return TlsScore(scaled @ weights + model.intercept, present, coverage)


def tls_regions(score: np.ndarray, xy: np.ndarray, threshold: float, link: float) -> np.ndarray:
    """Connected regions of called spots (score >= ``threshold``; spots closer than ``link`` are joined):
    a region id per spot, -1 for spots not called."""
    called = np.flatnonzero(score >= threshold)
    regions = np.full(len(score), -1, dtype=np.int64)
    if len(called) == 0:
        return regions
    pairs = cKDTree(xy[called]).query_pairs(link, output_type="ndarray")
    graph = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(called), len(called)))
    regions[called] = connected_components(graph, directed=False)[1]
    return regions


def tls_agreement(predicted: np.ndarray, measured: np.ndarray, top: float = 0.1,
                  threshold: float | None = None) -> dict[str, float]:
    """How well a predicted TLS score follows the measured one on a section: Pearson r, AUROC of the
    predicted score for the spots whose measured score is in the top ``top`` fraction, and with a call
    ``threshold`` the precision of the calls (called spots that are in that top fraction)."""
    positive = measured >= np.quantile(measured, 1 - top)
    auroc = float(roc_auc_score(positive, predicted)) if 0 < positive.sum() < len(positive) else float("nan")
    varies = np.ptp(predicted) > 0 and np.ptp(measured) > 0  # a constant score has no r (NaN, said quietly)
    pearson = float(np.corrcoef(predicted, measured)[0, 1]) if varies else float("nan")
    scores = {"pearson": pearson, "auroc_top_decile": auroc}
    if threshold is not None:
        called = predicted >= threshold
        scores["precision"] = float(positive[called].mean()) if called.any() else float("nan")
    return scores
