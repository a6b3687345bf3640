"""Standardisation of frozen image features, fitted on training spots and stored with the model."""

from __future__ import annotations

import numpy as np
import torch


class FeatureScaler:
    """z-score per feature dimension; mean/std come from training spots only."""

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        self.mean, self.std = mean, std

    def fit(self, features: np.ndarray) -> FeatureScaler:
        self.mean = features.mean(axis=0).astype(np.float32)
        std = features.std(axis=0).astype(np.float32)
        self.std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        return self

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)

    def state(self, prefix: str = "scaler") -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": torch.from_numpy(self.mean), f"{prefix}.std": torch.from_numpy(self.std)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "scaler") -> FeatureScaler:
        return cls(state[f"{prefix}.mean"].numpy(), state[f"{prefix}.std"].numpy())
