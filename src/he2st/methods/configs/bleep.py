"""Options of BLEEP: he2st's variant (``bleep``) and the published choices (``bleep_faithful``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from he2st.methods.configs.common import FinetuneConfig, RetrievalConfig, TrainConfig, preset


class BLEEPConfig(RetrievalConfig, FinetuneConfig):
    """Options of BLEEP (defaults: he2st's variant; alignment and retrieval as RetrievalConfig, end-to-end
    training as FinetuneConfig)."""

    negatives: Literal["batch", "queue", "all"] = Field(
        "all", description="negatives beyond the batch: 'queue': a memory queue (end to end); 'all': a bank of every "
        "training spot")
    queue_size: int = Field(1024, ge=0, description="size of the memory queue for negatives='queue'")
    standardize_targets: bool = Field(
        False, description="z-score each gene before the expression tower (BLEEP: False)")
    ensemble: int = Field(5, gt=0, description="independently seeded heads whose cosine similarities are averaged")
    query_neighbours: int = Field(
        6, ge=0, description="average each query's image embedding with its k nearest spots' (same slide); 0: off "
        "(BLEEP)")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=20, batch_size=128, lr=3e-4, weight_decay=1e-3),
        description="optimiser and early stopping (BLEEP: AdamW lr 1e-3, wd 1e-3, batch 256, 60 epochs)")


BLEEPFaithfulConfig = preset(
    BLEEPConfig, "BLEEPFaithfulConfig", "BLEEP as published (docs/methods/bleep_faithful.md).",
    expression_encoder="projection", loss="bleep_soft", temperature=1.0, learn_temperature=False,
    negatives="batch", ensemble=1, weighting="average", per_sample=False, query_neighbours=0,
    # BLEEP trains every epoch and keeps the best checkpoint, without gradient clipping
    train=TrainConfig(epochs=60, batch_size=256, lr=1e-3, weight_decay=1e-3, patience=60, grad_clip=None),
)
