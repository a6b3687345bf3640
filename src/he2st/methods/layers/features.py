"""Standardisation of features and targets (fitted on training spots, stored with the model), and
clean-up of cell-type proportion tables."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA


class FeatureScaler:
    """z-score per feature dimension; mean/std come from training spots only. With ``components``, the
    z-scores are then projected on the training spots' top principal axes (scaled so the projection has
    unit mean variance, relative variances kept): a model whose first layer reads every neighbour of
    every spot then multiplies a few hundred inputs instead of the encoder's 1,000+."""

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None,
                 axes: np.ndarray | None = None) -> None:
        self.mean, self.std, self.axes = mean, std, axes  # axes: (components, features), scaled

    def fit(self, features: np.ndarray, components: int | None = None) -> FeatureScaler:
        self.mean = features.mean(axis=0).astype(np.float32)
        std = features.std(axis=0).astype(np.float32)
        self.std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        self.axes = None
        if components is not None and components < min(features.shape):
            z = (features - self.mean) / self.std  # centred already: the axes need no offset
            pca = PCA(n_components=components, svd_solver="covariance_eigh").fit(z)
            self.axes = (pca.components_ / np.sqrt(pca.explained_variance_.mean())).astype(np.float32)
        return self

    @property
    def dim(self) -> int:
        """Width of the scaled output."""
        return len(self.mean) if self.axes is None else len(self.axes)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.std).astype(np.float32)
        return z if self.axes is None else z @ self.axes.T

    def state(self, prefix: str = "scaler") -> dict[str, torch.Tensor]:
        state = {f"{prefix}.mean": torch.from_numpy(self.mean), f"{prefix}.std": torch.from_numpy(self.std)}
        return state if self.axes is None else state | {f"{prefix}.axes": torch.from_numpy(self.axes)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "scaler") -> FeatureScaler:
        axes = state.get(f"{prefix}.axes")
        return cls(state[f"{prefix}.mean"].numpy(), state[f"{prefix}.std"].numpy(),
                   None if axes is None else axes.numpy())


def centred_within_samples(targets: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """``targets`` with each sample's per-gene mean replaced by the mean over all rows: what is left is each
    spot's deviation from its own sample, at the common level. A sample's level is set by sequencing depth,
    capture and batch, which its image does not show; a model that fits it from the features learns stain and
    scanner differences as if they were expression."""
    out = targets.astype(np.float32, copy=True)
    overall = out.mean(0)
    for sid in np.unique(sample_ids):
        rows = sample_ids == sid
        out[rows] += overall - out[rows].mean(0)
    return out


def standardize_columns(x: np.ndarray) -> np.ndarray:
    """Per-column z-scores (as float32), used for expression-similarity soft targets."""
    return ((x - x.mean(0)) / np.maximum(x.std(0), 1e-6)).astype(np.float32)


def clean_proportions(props: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows normalised to sum 1 (negatives clipped) and a mask of usable rows (finite, positive sum):
    deconvolution tables carry NaN rows and tiny negative values that would break a simplex target."""
    props = np.asarray(props, dtype=np.float64)
    ok = np.isfinite(props).all(axis=1)
    clipped = np.where(np.isfinite(props), np.clip(props, 0, None), 0.0)
    total = clipped.sum(axis=1)
    ok &= total > 0
    normed = clipped / np.where(total > 0, total, 1.0)[:, None]
    return normed.astype(np.float32), ok
