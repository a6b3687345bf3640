"""Scores of a model's reliability on held-out patients: interval coverage and width, how well the
expected per-gene r ranks the realised one, and how well the out-of-distribution score finds the worst spots.

They check, on patients the model never saw, what :mod:`he2st.methods.calibration` promised from the
training patients alone; none of them feeds back into a fit.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

RELIABILITY_METRICS: tuple[str, ...] = (
    "coverage90", "interval_width90", "coverage90_constant", "interval_width90_constant",
    "predictability_spearman", "ood_auroc", "ood_fraction",
)
WORST_FRACTION = 0.1  # the spots with the largest errors that the OOD score should find (top decile)


def coverage(truth: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Fraction of measured values (spots x genes) inside their intervals."""
    return float(((truth >= lower) & (truth <= upper)).mean())


def mean_width(lower: np.ndarray, upper: np.ndarray) -> float:
    """Mean interval width."""
    return float(np.mean(upper - lower))


def predictability_spearman(expected_r: np.ndarray, realised: np.ndarray) -> float:
    """Spearman correlation across genes between the expected and the realised per-gene r."""
    ok = np.isfinite(realised) & np.isfinite(expected_r)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(expected_r[ok], realised[ok]).statistic)


def ood_auroc(ood_score: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> float:
    """AUROC of the OOD score for the spots whose mean absolute error is in the top decile."""
    error = np.abs(pred - truth).mean(1)
    worst = error >= np.quantile(error, 1 - WORST_FRACTION)
    if worst.all() or not worst.any():
        return float("nan")
    return float(roc_auc_score(worst, ood_score))


def reliability_metrics(pred: np.ndarray, truth: np.ndarray, intervals: np.ndarray, constant: np.ndarray,
                        ood_score: np.ndarray, in_distribution: np.ndarray) -> dict[str, float]:
    """The per-spot :data:`RELIABILITY_METRICS` of one held-out sample (all but ``predictability_spearman``,
    which is a fold's). ``intervals`` and ``constant`` are the (2, N, G) lower/upper bounds at 90% of the
    normalised and the constant-width conformal intervals."""
    return {
        "coverage90": coverage(truth, *intervals), "interval_width90": mean_width(*intervals),
        "coverage90_constant": coverage(truth, *constant), "interval_width90_constant": mean_width(*constant),
        "ood_auroc": ood_auroc(ood_score, pred, truth),
        "ood_fraction": float(1.0 - np.mean(in_distribution)),
    }
