"""Per-gene and per-sample scores for predicted spot expression.

Every function takes ``pred`` and ``true`` as ``(n_spots, n_genes)`` arrays of the same shape,
in the same (transformed) space. The field's headline number is the per-gene Pearson
correlation across the spots of one held-out sample (HEST, BLEEP, CMRCNet), averaged over a
gene set; the other scores are here so a reader can see what that number hides.

Genes that are constant in either array have no defined correlation. They get NaN, never 0:
a silent 0 would drag means down for one method and not another depending on how its
predictions collapse, and a silent drop would hide that the model predicted a constant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from he2st.errors import He2stError
from he2st.stats import column_pearson, constant_columns, finite_pair, pearson_per_gene, spearman_per_gene

__all__ = [
    "SET_METRICS",
    "SampleScores",
    "evaluate_sample",
    "gene_gene_correlation_preservation",
    "mae_per_gene",
    "mse_per_gene",
    "pearson_per_gene",
    "pearson_per_spot",
    "spearman_per_gene",
]

#: Keys of one gene set's summary, in the order tables show them.
SET_METRICS: tuple[str, ...] = (
    "pearson_mean",
    "pearson_median",
    "spearman_mean",
    "mse",
    "mae",
    "gene_gene_corr",
    "n_genes",
    "n_nan",
)


def mse_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean squared error across spots for each gene, shape ``(n_genes,)``."""
    p, t = finite_pair(pred, true)
    return ((p - t) ** 2).mean(axis=0)


def mae_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean absolute error across spots for each gene, shape ``(n_genes,)``."""
    p, t = finite_pair(pred, true)
    return np.abs(p - t).mean(axis=0)


def pearson_per_spot(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation across genes for each spot, shape ``(n_spots,)``.

    Caveat: reported in some papers, but inflated and hardly informative. Genes differ far
    more in their mean level than spots differ from each other, so any prediction that
    gets the panel's average profile right (e.g. predicting the training mean at every
    spot) scores high here while carrying no spatial information. Prefer per-gene scores.
    NaN for spots constant in either array.
    """
    p, t = finite_pair(pred, true)
    return column_pearson(p.T, t.T)


#: Gene-pair correlations closer than this are one value: every pair of a matrix whose genes all follow one
#: pattern correlates at 1 up to round-off (~1e-16), and the Pearson of that round-off with the true pairs
#: would be a number carrying no information instead of the undefined value it is.
_SAME_CORRELATION = 1e-9


def _correlation_matrix(a: np.ndarray) -> np.ndarray:
    """Gene x gene Pearson matrix of a finite matrix with no constant columns."""
    z = a - a.mean(axis=0)
    z /= np.sqrt((z * z).sum(axis=0))
    return np.clip(z.T @ z, -1.0, 1.0)


def gene_gene_correlation_preservation(
    pred: np.ndarray, true: np.ndarray, genes_idx: Sequence[int] | np.ndarray | None = None
) -> float:
    """How well predictions keep co-expression: Pearson between the upper triangles of the
    gene x gene correlation matrices of ``pred`` and ``true``.

    A model can score well per gene while blurring every gene towards one shared spatial
    pattern; that shows up here as a correlation structure unlike the true one. Per-gene
    affine rescaling with positive slope leaves the score at 1.

    NaN-safe: genes constant in either array are left out of both matrices (their
    correlations are undefined); NaN is returned when fewer than three genes remain,
    because fewer than two gene pairs cannot be correlated, and when every gene pair of either
    array correlates alike (e.g. all predicted genes are one spatial pattern scaled: their
    pairs all correlate at 1). ``genes_idx`` restricts the comparison to those columns.
    """
    p, t = finite_pair(pred, true)
    if genes_idx is not None:
        idx = np.asarray(genes_idx, dtype=np.intp)
        p, t = p[:, idx], t[:, idx]
    keep = ~(constant_columns(p) | constant_columns(t))
    if keep.sum() < 3:
        return float("nan")
    cp = _correlation_matrix(p[:, keep])
    ct = _correlation_matrix(t[:, keep])
    upper = np.triu_indices(int(keep.sum()), k=1)
    a, b = cp[upper], ct[upper]
    if np.ptp(a) <= _SAME_CORRELATION or np.ptp(b) <= _SAME_CORRELATION:
        return float("nan")
    r = column_pearson(a[:, None], b[:, None])[0]
    return float(r)


@dataclass(frozen=True)
class SampleScores:
    """All scores of one held-out sample.

    ``per_gene`` has columns gene, pearson, spearman, mse, mae (one row per panel gene);
    ``per_set`` maps a gene-set name to its summary (keys in ``SET_METRICS``);
    ``gene_gene_corr`` is the co-expression preservation over the whole panel.
    """

    per_gene: pd.DataFrame
    per_set: dict[str, dict[str, float]]
    gene_gene_corr: float


def _nan_stat(values: np.ndarray, stat: str) -> float:
    """Mean or median over the non-NaN values; NaN (without a warning) when there are none."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return float("nan")
    return float(np.mean(finite) if stat == "mean" else np.median(finite))


def _set_indices(genes: Sequence[str], gene_sets: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Column indices of each gene set, refusing sets the panel cannot score."""
    position = {g: i for i, g in enumerate(genes)}
    if len(position) != len(genes):
        dupes = sorted(g for g, k in Counter(genes).items() if k > 1)
        raise He2stError(f"gene list has duplicate names: {', '.join(dupes[:5])}")
    out: dict[str, np.ndarray] = {}
    for name, members in gene_sets.items():
        members = list(members)
        if not members:
            raise He2stError(f"gene set {name!r} is empty")
        if len(set(members)) != len(members):
            raise He2stError(f"gene set {name!r} names some genes more than once")
        missing = [g for g in members if g not in position]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise He2stError(
                f"gene set {name!r} names {len(missing)} gene(s) not in the evaluated panel: {shown}"
            )
        out[name] = np.array([position[g] for g in members], dtype=np.intp)
    return out


def evaluate_sample(
    pred: np.ndarray,
    true: np.ndarray,
    genes: Sequence[str],
    gene_sets: Mapping[str, Sequence[str]],
) -> SampleScores:
    """Score one held-out sample: a per-gene table and one summary per gene set.

    Set means of correlations skip NaN genes (constant in pred or true) and report how many
    were skipped in ``n_nan``, so a method that predicts constants cannot look better by
    having fewer genes averaged without the table saying so. ``mse``/``mae`` are means over
    all the set's genes. Each set also gets ``gene_gene_corr`` over its own genes.
    """
    p, t = finite_pair(pred, true)
    if p.shape[1] != len(genes):
        raise He2stError(f"pred has {p.shape[1]} gene columns but {len(genes)} gene names were given")
    index = _set_indices(genes, gene_sets)

    pearson = column_pearson(p, t)
    spearman = spearman_per_gene(p, t)
    mse = mse_per_gene(p, t)
    mae = mae_per_gene(p, t)
    per_gene = pd.DataFrame(
        {"gene": list(genes), "pearson": pearson, "spearman": spearman, "mse": mse, "mae": mae}
    )

    panel_ggc = gene_gene_correlation_preservation(p, t)
    whole_panel = np.arange(len(genes))
    per_set: dict[str, dict[str, float]] = {}
    for name, idx in index.items():
        r = pearson[idx]
        # The panel-wide matrix can be large; reuse it for a set that is the whole panel.
        ggc = panel_ggc if np.array_equal(idx, whole_panel) else gene_gene_correlation_preservation(p, t, idx)
        per_set[name] = {
            "pearson_mean": _nan_stat(r, "mean"),
            "pearson_median": _nan_stat(r, "median"),
            "spearman_mean": _nan_stat(spearman[idx], "mean"),
            "mse": float(mse[idx].mean()),
            "mae": float(mae[idx].mean()),
            "gene_gene_corr": ggc,
            "n_genes": int(idx.size),
            "n_nan": int(np.isnan(r).sum()),
        }
    return SampleScores(per_gene=per_gene, per_set=per_set, gene_gene_corr=panel_ggc)
