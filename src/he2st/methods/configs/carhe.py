"""Options of CarHE (he2st's reading of the abstract)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from he2st.methods.configs.common import RetrievalConfig, TrainConfig


class CarHEConfig(RetrievalConfig):
    """Options of CarHE (contrastive and retrieval options as RetrievalConfig)."""

    image_hidden: list[PositiveInt] = Field(
        default_factory=list, description="hidden widths of the image tower before its projection head ([]: BLEEP's "
        "head)")
    celltype_transfer: bool = Field(
        True, description="cell-type proportions as a third modality, with a proportion head; False: off")
    celltype_key: str = Field(
        "celltype_major", description="extras key of per-spot proportions; celltypes_from='reference': the reference's "
        "obs column")
    celltypes_from: Literal["auto", "extras", "programmes", "reference"] = Field(
        "auto", description="third modality: 'extras' proportions, NMF 'programmes', Tangram on a 'reference'; 'auto': "
        "extras if present")
    celltype_reference: Path | None = Field(
        None, description="single-cell reference .h5ad (counts, cell-type column celltype_key) for "
        "celltypes_from='reference'")
    programmes: int = Field(8, ge=2, description="number of NMF expression programmes (celltypes_from='programmes')")
    proportion_hidden: list[PositiveInt] = Field(
        default_factory=lambda: [64], description="hidden widths of the proportion encoder")
    celltype_weight: float = Field(
        0.5, ge=0, description="weight of the proportion-image and proportion-expression alignment")
    proportion_head_weight: float = Field(1.0, ge=0, description="weight of the proportion head's loss")
    proportion_head_hidden: int = Field(128, gt=0, description="hidden width of the proportion head")
    histology_transfer: bool = Field(
        True, description="image-image contrastive learning between augmented views and physical neighbours; "
        "False: off")
    histology_weight: float = Field(0.5, ge=0, description="weight of the histology term in the joint stage")
    histology_temperature: float = Field(0.1, gt=0, description="τ of the image-image InfoNCE")
    histology_neighbours: int = Field(
        6, ge=0, description="nearest spots of the same sample that count as positives; 0: augmented views only")
    histology_max_distance_um: float | None = Field(
        None, gt=0, description="neighbours farther than this (µm) are not positives")
    histology_pretrain_epochs: int = Field(
        10, ge=0, description="histology-only pre-training epochs of the image tower (training + unlabelled spots)")
    augment_dropout: float = Field(0.2, ge=0, lt=1, description="feature dropout of an augmented view")
    query_neighbours: int = Field(
        6, ge=0, description="average each query's image embedding with its k nearest spots' (same slide); 0: off")
    augment_noise: float = Field(
        0.1, ge=0, description="std of the Gaussian noise of an augmented view (standardised units)")
    per_sample: bool = Field(
        False, description="retrieve top_k within each reference sample and average the samples; False: one pooled "
        "top_k")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=60, batch_size=128, lr=1e-3, weight_decay=1e-3),
        description="optimiser and early stopping of the joint stage (pre-training: same lr and batch size)")

    @model_validator(mode="after")
    def _reference_given(self) -> CarHEConfig:
        if self.celltypes_from == "reference" and self.celltype_reference is None:
            raise ValueError("celltypes_from='reference' needs celltype_reference (a single-cell .h5ad)")
        return self
