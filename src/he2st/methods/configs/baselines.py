"""Options of the baselines: the HEST-Benchmark ridge probe, ST-Net-style MLP regression, image kNN."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from he2st.methods.configs.common import MethodConfig, TrainConfig, preset


class RidgeConfig(MethodConfig):
    """Options of the ridge probe (defaults: HEST-Benchmark's)."""

    pca_components: int = Field(256, gt=0, description="PCA components after standard scaling (HEST-Benchmark: 256)")
    alpha: float | None = Field(None, ge=0, description="ridge penalty; None: HEST's 100 / (n_components * n_genes)")
    alpha_cv: bool = Field(False, description="choose alpha by inner cross-validation over training patients")
    alphas: list[PositiveFloat] = Field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5], min_length=1,
                                description="candidate alphas for alpha_cv")
    fit_intercept: bool = Field(False, description="fit an intercept (HEST-Benchmark: False)")
    celltype_key: str | None = Field(
        "celltype_major", description="extras key of cell-type proportions also fitted and predicted, when training "
        "spots carry them; None: off")


RidgeCVConfig = preset(RidgeConfig, "RidgeCVConfig", "The ridge probe with alpha chosen by inner CV and an intercept.",
                       alpha_cv=True, fit_intercept=True)


class MLPConfig(MethodConfig):
    """Options of the MLP regression (defaults: he2st's; ``n_models=1, epochs_by='validation'``: ST-Net's)."""

    hidden: list[PositiveInt] = Field(default_factory=lambda: [256], description="hidden widths")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout after each hidden layer")
    standardize_targets: bool = Field(
        True, description="regress per-gene z-scores (training statistics); predictions return to the panel's scale")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=200, batch_size=128, lr=1e-4, weight_decay=1e-2, patience=20),
        description="optimiser and early stopping on the validation Pearson")
    pca_components: int | None = Field(
        256, gt=0, description="project the standardised features on the training spots' top principal axes; "
        "None: no projection")
    n_models: int = Field(
        5, ge=1, description="networks trained from seeds seed..seed+n-1 and averaged; 1: ST-Net's single network")
    inner_folds: int = Field(3, ge=2, le=10, description="most inner folds for epochs_by='inner_cv'")
    epochs_by: Literal["inner_cv", "validation"] = Field(
        "inner_cv", description="epoch count chosen by cross-validation over training patients, or by early "
        "stopping on validation spots")


class KNNConfig(MethodConfig):
    """Options of image-to-image retrieval."""

    top_k: int = Field(50, gt=0, description="training spots retrieved per query")
    weighting: Literal["average", "softmax", "similarity"] = Field(
        "average", description="how the retrieved profiles are combined")
    per_sample: bool = Field(
        True, description="retrieve top_k within each training sample and average the samples; False: one pooled "
        "top_k")
