"""How far to trust a fitted model: per-gene predictability, per-spot intervals, out-of-distribution flags.

A :class:`Reliability` travels with a model (saved in its checkpoint). Everything in it was measured on
*held-out training patients* (inner patient-level folds, :mod:`he2st.methods.calibration`), so it speaks
of what happens on a patient the model has not seen:

* ``expected_r``: each gene's mean Pearson on the held-out sections, ``expected_r_low`` a one-sided 90%
  lower bound of that mean (Fisher z, t quantile over the held-out sections);
* per-spot intervals by normalised split-conformal prediction with patients as the units: the
  nonconformity of a held-out spot is its absolute error divided by its *difficulty*, the local outlier
  factor of its image features among the training spots (scikit-learn); a new spot's interval is its
  prediction plus/minus the score's conformal quantile times its own difficulty, so intervals widen where
  the model has seen nothing alike.
  The outlier factor compares a spot's distance to its neighbours with theirs to their own, so it does not
  shrink as the reference grows: inner folds, whose references are smaller, measure it on the scale the
  final model's reference gives new spots, where plain neighbour distances would be larger inside;
* the same difficulty is the out-of-distribution score: spots scoring above what held-out training patients
  reach (their ``ood_level`` quantile) are flagged.

Each held-out patient has an equal say in the conformal quantile (the pooled per-patient distributions of
Dunn, Wasserman & Ramdas, JASA 2023), whatever its number of spots: the interval is meant for a spot of a
*new patient*, and pooling spots would let the patient with most spots set it. The guarantee is marginal
over spots and per gene, under exchangeable patients: see the documentation page on reliability for its
limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import LocalOutlierFactor

PROJECTION_DIMS = 32  # principal components kept of the image features (plus their residual norm)
NEIGHBOURS = 20  # training spots whose distances make a spot's difficulty (scikit-learn's default for LOF)
MAX_REFERENCE = 20_000  # training spots kept for the distances (a seeded subsample beyond)
MAX_SCORES = 5_000  # held-out spots kept for the conformal quantiles (beyond, a seeded draw even over patients)


@dataclass
class FeatureDistance:
    """How far image features lie from the training spots' (local outlier factor), in a compact projection.

    Features are standardised, projected on their leading principal components, and the norm of what the
    projection leaves out is kept as one more coordinate -- an image unlike every training patch can sit
    near the centre of the components and far off them, and that last coordinate sees it."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    components: np.ndarray  # (D, c)
    reference: np.ndarray  # (n, c + 1) training spots, projected

    @classmethod
    def fit(cls, features: np.ndarray, seed: int = 0) -> FeatureDistance:
        x = np.asarray(features, np.float64)
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-8, scale, 1.0)
        z = (x - mean) / scale
        c = max(1, min(PROJECTION_DIMS, z.shape[0] - 1, z.shape[1]))
        _, _, vt = np.linalg.svd(z[np.random.default_rng(seed).permutation(len(z))[:MAX_REFERENCE]],
                                 full_matrices=False)
        projection = cls(mean.astype(np.float32), scale.astype(np.float32), vt[:c].T.astype(np.float32),
                         np.zeros((0, c + 1), np.float32))
        rows = np.random.default_rng(seed).permutation(len(x))[:MAX_REFERENCE]
        projection.reference = projection.project(x[np.sort(rows)])
        return projection

    def project(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float32) - self.mean) / self.scale
        coords = z @ self.components
        rest = np.sqrt(np.maximum((z * z).sum(1) - (coords * coords).sum(1), 0.0))
        return np.concatenate([coords, rest[:, None]], axis=1).astype(np.float32)

    def estimator(self) -> LocalOutlierFactor:
        k = max(1, min(NEIGHBOURS, len(self.reference) - 1))
        return LocalOutlierFactor(n_neighbors=k, novelty=True).fit(self.reference)

    def distances(self, features: np.ndarray, estimator: LocalOutlierFactor | None = None) -> np.ndarray:
        """Local outlier factor of each spot among the training spots (about 1 inside them, its difficulty and
        OOD score)."""
        return -np.asarray((estimator or self.estimator()).score_samples(self.project(features)), np.float64)


@dataclass
class Reliability:
    """What inner patient-level folds measured of a model; applied to every prediction it makes."""

    genes: list[str]  # the panel's, then any beyond it that the model retrieves (expected r only)
    expected_r: np.ndarray  # (G,) mean held-out Pearson per gene
    expected_r_low: np.ndarray  # (G,) one-sided 90% lower bound of that mean
    residuals: np.ndarray  # (R, G) absolute errors of held-out spots
    difficulty: np.ndarray  # (R,) those spots' difficulty (outlier factor among their inner training spots)
    distance: FeatureDistance  # to all training spots, for new spots
    ood_threshold: float  # difficulty above which a spot is out of distribution
    ood_level: float  # the held-out quantile that set it
    normalised: bool  # intervals scale with each spot's difficulty (chosen on the inner folds), else constant
    held_out: list[list[str]]  # the groups (patients, else samples) each inner fold held out
    units: str  # "patients" or "samples"
    n_sections: int  # held-out sections behind expected_r
    #: per named score (e.g. a TLS signature): expected_r, expected_r_low, call threshold, precision, recall
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    #: (R,) each residual row's weight in the conformal quantile, summing to 1: every held-out patient (or
    #: sample) weighs the same; None: equal rows
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._estimator: LocalOutlierFactor | None = None

    # ------------------------------------------------------------------ applying it
    def spot_difficulty(self, features: np.ndarray) -> np.ndarray:
        if self._estimator is None:
            self._estimator = self.distance.estimator()
        return self.distance.distances(features, self._estimator)

    def intervals(self, expression: np.ndarray, difficulty: np.ndarray, coverage: float,
                  normalised: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds (N, G) at ``coverage``, scaled by difficulty as the inner folds chose
        (``normalised`` forces one kind: the benchmark reports constant width beside the chosen kind)."""
        normalised = self.normalised if normalised is None else normalised
        calib = np.maximum(self.difficulty, 1e-12) if normalised else np.ones(len(self.difficulty))
        sigmas = np.maximum(difficulty, 1e-12) if normalised else np.ones(len(expression))
        quantile = conformal_quantile(self.residuals / calib[:, None], self.weights, coverage)
        half = (sigmas[:, None] * quantile[None, :]).astype(np.float32)
        expression = np.asarray(expression, np.float32)
        return expression - half, expression + half

    def annotate(self, expression: np.ndarray, features: np.ndarray, coverage: float) -> dict[str, np.ndarray]:
        """Per-spot outputs for a prediction: intervals (``lower``, ``upper``), ``ood_score`` (difficulty as a
        multiple of the threshold) and ``in_distribution``."""
        difficulty = self.spot_difficulty(features)
        lower, upper = self.intervals(expression, difficulty, coverage)
        score = difficulty / max(self.ood_threshold, 1e-12)
        return {"lower": lower, "upper": upper, "ood_score": score.astype(np.float32),
                "in_distribution": (score <= 1.0).astype(np.float32)}

    def gene_columns(self, genes: list[str]) -> dict[str, np.ndarray]:
        """``expected_r`` and ``expected_r_low`` for ``genes`` (NaN for a gene it did not measure), as the
        ``var`` columns of a prediction."""
        index = {g: i for i, g in enumerate(self.genes)}
        rows = np.array([index.get(g, -1) for g in genes])
        return {key: np.where(rows >= 0, values[np.maximum(rows, 0)], np.nan).astype(np.float32)
                for key, values in (("expected_r", self.expected_r), ("expected_r_low", self.expected_r_low))}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, torch.Tensor]:
        arrays = {"expected_r": self.expected_r, "expected_r_low": self.expected_r_low,
                  "residuals": self.residuals, "difficulty": self.difficulty, "mean": self.distance.mean,
                  "scale": self.distance.scale, "components": self.distance.components,
                  "reference": self.distance.reference}
        if self.weights is not None:
            arrays["weights"] = self.weights
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}

    def layout(self) -> dict[str, Any]:
        return {"genes": self.genes, "ood_threshold": self.ood_threshold, "ood_level": self.ood_level,
                "normalised": self.normalised, "held_out": self.held_out, "units": self.units, "n_sections": self.n_sections,
                "scores": self.scores}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], layout: dict[str, Any]) -> Reliability:
        a = {k: v.numpy() for k, v in state.items()}
        distance = FeatureDistance(a["mean"], a["scale"], a["components"], a["reference"])
        return cls(list(layout["genes"]), a["expected_r"], a["expected_r_low"], a["residuals"], a["difficulty"],
                   distance, float(layout["ood_threshold"]), float(layout["ood_level"]), bool(layout["normalised"]),
                   [list(g) for g in layout["held_out"]], str(layout["units"]), int(layout["n_sections"]),
                   dict(layout.get("scores", {})), a.get("weights"))

    def summary(self) -> dict[str, Any]:
        """A few numbers for the model card."""
        top = [self.genes[g] for g in np.argsort(-self.expected_r)[:5]]
        return {"held_out": ["+".join(g) for g in self.held_out], "units": self.units,
                "sections": self.n_sections, "mean_expected_r": round(float(np.nanmean(self.expected_r)), 4),
                "genes_expected_r_above_0.3": int((self.expected_r > 0.3).sum()),
                "genes_lower_bound_above_0.1": int((self.expected_r_low > 0.1).sum()),
                "most_predictable": top, "ood_level": self.ood_level,
                "intervals": "scaled by difficulty" if self.normalised else "constant width",
                "scores": self.scores}


def conformal_quantile(scores: np.ndarray, weights: np.ndarray | None, coverage: float) -> np.ndarray:
    """Per column of ``scores`` (R, G), the ``coverage`` quantile of its rows under ``weights`` (R,; None:
    equal), the inverse of the weighted empirical distribution function: a new spot drawn like the weighted
    held-out population has its score at most this with probability ``coverage``."""
    return np.quantile(scores, coverage, axis=0, weights=weights, method="inverted_cdf")
