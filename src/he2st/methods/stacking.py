"""How the ensemble turns its members' predictions into one: non-negative per-gene weights fitted on held-out
predictions (stacking), and the combination they define.

What is scored is each gene's pattern within a sample, so the weights are fitted on within-sample deviations
(level shifts between samples and patients would otherwise dominate), and each member's prediction is first
put on a common scale (standardised within each sample, as it will be within each predicted one; or its
held-out per-gene spread), so that "equal" means an equal say and stacked weights are comparable. The
combination is finally rescaled per gene to the spread of the measured expression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.linear_model import LinearRegression

GENE_BLOCK = 64  # genes standardised at a time at prediction

#: how the members' weights are set: fitted on all genes at once, per gene, or equal
Mode = Literal["global", "per_gene", "equal"]


def standardised(X: np.ndarray) -> np.ndarray:
    """``X`` (spots, ...) centred and scaled to unit spread along the spots; zero where it is constant up to
    float noise (not only exactly, as ``stats.constant_columns`` tests: noise must not be blown up to unit
    spread and given a member's say)."""
    centred = X - X.mean(0, keepdims=True)
    spread = centred.std(0, keepdims=True)
    constant = spread <= 1e-6 * (1.0 + np.abs(X).mean(0, keepdims=True))
    return np.where(constant, 0.0, centred / np.where(constant, 1.0, spread))


def shares(weights: np.ndarray) -> np.ndarray:
    """Non-negative per-gene weights (genes, members) made to sum to one per gene (equal where all are zero)."""
    total = weights.sum(1, keepdims=True)
    return np.where(total > 0, weights / np.where(total > 0, total, 1.0), 1.0 / weights.shape[1]).astype(np.float32)


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights of ``y ~ X`` (both centred); equal weights if all come out zero."""
    w = np.clip(LinearRegression(positive=True, fit_intercept=False).fit(X, y).coef_, 0, None)
    return w if w.sum() > 0 else np.full(X.shape[1], 1.0 / X.shape[1])


@dataclass
class Combination:
    """Members' predictions (spots, genes, members) -> one prediction (spots, genes).

    ``weights`` (genes or 1, members) and ``intercepts`` (genes) make a linear combination on the target scale.
    With ``deviations`` (genes, members; 'sample' scaling) each predicted sample gets instead the members'
    standardised patterns weighted by ``deviations`` around a level that is the members' levels weighted by
    ``level_shares`` (the same weights made to sum to one, so that the level is a weighted mean of levels every
    member predicts on the target scale)."""

    weights: np.ndarray
    intercepts: np.ndarray
    deviations: np.ndarray | None = None
    level_shares: np.ndarray | None = None

    @classmethod
    def equal(cls, members: int, genes: int) -> Combination:
        """The mean of the members, as they are (no held-out predictions to fit anything on)."""
        return cls(np.full((1, members), 1.0 / members, np.float32), np.zeros(genes, np.float32))

    def columns(self, columns: list[int]) -> Combination:
        """The combination of only these members (their weights as fitted; shares made to sum to one again)."""
        deviations = None if self.deviations is None else self.deviations[:, columns]
        return Combination(self.weights[:, columns], self.intercepts, deviations,
                           None if deviations is None else shares(deviations))

    def __call__(self, preds: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
        if self.deviations is None:
            return ((preds * self.weights[None]).sum(-1) + self.intercepts).astype(np.float32)
        # each predicted sample: the weighted members' level, plus their standardised patterns' combination
        # (in blocks of genes, so that a whole slide's float64 copies stay small)
        expression = np.empty(preds.shape[:2], np.float32)
        sample_ids = np.asarray(sample_ids).astype(str)
        for sid in np.unique(sample_ids):
            rows = np.flatnonzero(sample_ids == sid)
            for a in range(0, preds.shape[1], GENE_BLOCK):
                genes = slice(a, a + GENE_BLOCK)
                block = preds[rows, genes].astype(np.float64)
                if self.level_shares is not None:
                    level = (block.mean(0) * self.level_shares[genes]).sum(-1)
                else:  # checkpoints without level_shares: the linear combination's level
                    level = (block.mean(0) * self.weights[genes]).sum(-1) + self.intercepts[genes]
                expression[rows, genes] = level + (standardised(block) * self.deviations[None, genes]).sum(-1)
        return expression


def fit_combination(predictions: np.ndarray, targets: np.ndarray, sample_ids: np.ndarray, mode: Mode,
                    by_sample: bool) -> Combination:
    """The combination of held-out member ``predictions`` (spots, genes, members) that best matches ``targets``
    (spots, genes) within each of ``sample_ids``, under ``mode``; ``by_sample``: members standardised within
    each sample (else scaled by their held-out per-gene spread)."""
    X, y = predictions.astype(np.float64), targets
    Xc, yc = X.copy(), y.astype(np.float64)
    Z = np.empty_like(X) if by_sample else None  # standardised within each held-out sample
    sample_ids = np.asarray(sample_ids).astype(str)
    for sid in np.unique(sample_ids):
        rows = sample_ids == sid
        Xc[rows] -= X[rows].mean(0, keepdims=True)
        yc[rows] -= y[rows].mean(0, keepdims=True)
        if by_sample:
            Z[rows] = standardised(X[rows])
    spread = np.maximum(Xc.std(0), 1e-8)  # (genes, members)
    if not by_sample:
        Z = Xc / spread
    members = X.shape[-1]
    if mode == "equal":
        w = np.full((y.shape[1], members), 1.0 / members)
    elif mode == "global":
        w = np.broadcast_to(_nnls(Z.reshape(-1, members), yc.reshape(-1)), (y.shape[1], members))
    else:
        w = np.stack([_nnls(Z[:, g], yc[:, g]) for g in range(y.shape[1])])
    combined = np.einsum("ngm,gm->ng", Z, w)
    scale = yc.std(0) / np.maximum(combined.std(0), 1e-8)
    weights = (w / spread * scale[:, None]).astype(np.float32)
    intercepts = (y.mean(0) - np.einsum("gm,gm->g", weights, X.mean(0))).astype(np.float32)
    if not by_sample:
        return Combination(weights, intercepts)
    deviations = (w * scale[:, None]).astype(np.float32)
    return Combination(weights, intercepts, deviations, shares(deviations))
