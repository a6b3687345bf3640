"""Per-gene correlation kernels, shared by model selection inside methods and by evaluation.

Genes that are constant in either array have no defined correlation. They get NaN, never 0:
a silent 0 would drag means down for one method and not another depending on how its
predictions collapse, and a silent drop would hide that the model predicted a constant.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
from scipy.stats import rankdata

from he2st.errors import He2stError

__all__ = ["column_pearson", "constant_columns", "finite_pair", "one_standard_error_choice", "pearson_per_gene",
           "spearman_per_gene"]

K = TypeVar("K", bound=Hashable)


def finite_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both arrays as finite float64 matrices of one shape, or explain why not.

    Non-finite values are refused rather than skipped: a NaN prediction is a bug upstream,
    and scoring around it would report a number for spots the model never predicted.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.ndim != 2 or t.ndim != 2:
        raise He2stError(f"pred and true must be 2-D (spots x genes); got shapes {p.shape} and {t.shape}")
    if p.shape != t.shape:
        raise He2stError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    if p.shape[0] == 0:
        raise He2stError("pred and true have no spots to score")
    for name, a in (("pred", p), ("true", t)):
        if not np.isfinite(a).all():
            raise He2stError(f"{name} contains {int((~np.isfinite(a)).sum())} non-finite values (NaN or inf)")
    return p, t


def constant_columns(a: np.ndarray) -> np.ndarray:
    """Columns whose values are all identical.

    Tested exactly rather than by a small standard deviation: centring a constant column
    can leave round-off of ~1e-17 that would otherwise yield a meaningless correlation.
    """
    return (a == a[:1]).all(axis=0)


def column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of two finite matrices; NaN where undefined."""
    undefined = constant_columns(a) | constant_columns(b)
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    denom = np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc).sum(axis=0) / denom
    r = np.clip(r, -1.0, 1.0)
    r[undefined] = np.nan
    return r


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation across spots for each gene, shape ``(n_genes,)``.

    NaN for a gene that is constant in ``pred`` or in ``true`` (correlation undefined).
    """
    p, t = finite_pair(pred, true)
    return column_pearson(p, t)


def mean_sample_pearson(pred: np.ndarray, true: np.ndarray, samples: np.ndarray) -> float:
    """Mean over samples of each sample's mean per-gene Pearson (genes undefined in a sample skipped) --
    the benchmark's headline, so that selections made on held-out training spots score what it scores: a
    gene's pattern within a section, not the level shifts between sections that a pooled correlation
    rewards."""
    samples = np.asarray(samples).astype(str)
    scores = [np.nanmean(r) for s in np.unique(samples)
              if np.isfinite(r := pearson_per_gene(pred[samples == s], true[samples == s])).any()]
    return float(np.mean(scores)) if scores else float("nan")


def spearman_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman rank correlation across spots for each gene, shape ``(n_genes,)``.

    Pearson of average ranks (ties share their mean rank), so it matches
    ``scipy.stats.spearmanr``; NaN for genes constant in either array.
    """
    p, t = finite_pair(pred, true)
    return column_pearson(rankdata(p, axis=0), rankdata(t, axis=0))


def one_standard_error_choice(scores: Mapping[K, Sequence[float]], default: K) -> K:
    """The option with the best mean score over folds, if it beats ``default`` by more than one standard
    error of their paired per-fold differences; else ``default`` (Breiman's one-standard-error rule).

    Cross-validated scores on a few folds are noisy, and taking the plain argmax then picks options that
    were lucky on those folds. The rule keeps the default unless the evidence is clear -- with two
    folds, unless the best option is ahead in both -- and follows the scores as folds accumulate.
    ``scores`` holds each option's per-fold scores, in the same fold order; NaN folds are skipped.
    """
    best = max(scores, key=lambda k: np.nanmean(scores[k]))
    diff = np.asarray(scores[best], float) - np.asarray(scores[default], float)
    diff = diff[np.isfinite(diff)]
    if best == default or len(diff) < 2:
        return default
    return best if diff.mean() > diff.std(ddof=1) / np.sqrt(len(diff)) else default
