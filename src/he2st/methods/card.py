"""The model card: everything a fitted model needs to be applied, scored and described.

One pydantic document, written into every checkpoint and read by ``he2st evaluate``, ``predict`` and
``report`` -- which genes on which scale, from which features (encoder spec and weights checksum,
patch spec, embedding recipe), trained on which samples and patients, with which training curves.
No consumer guesses a missing field: a card without the features it needs is refused by name.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchSpec
from he2st.encoders.spec import EncoderSpec
from he2st.errors import He2stError
from he2st.version import __version__


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


class ModelCard(BaseModel):
    """What a checkpoint is: its panel and target scale, its input features and its training data."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="registered method name")
    he2st_version: str = __version__
    created: str = Field(default_factory=_now, description="UTC time the card was written")
    panel: GenePanel = Field(description="genes predicted and the transform of their targets")
    encoder: EncoderSpec | None = Field(None, description="the encoder whose features the model reads")
    weights_sha256: str | None = Field(None, description="checksum of the encoder weights file, when local")
    patch: PatchSpec | None = Field(None, description="how the patches behind those features were cut")
    embedding: EmbedConfig | None = Field(None, description="stain, TTA, precision and weights of the features")
    gene_sets: dict[str, list[str]] = Field(default_factory=dict, description="HEG/HVG sets chosen on training spots")
    training_samples: dict[str, str] = Field(default_factory=dict, description="sample id -> patient id")
    curves: dict[str, list[float]] = Field(default_factory=dict, description="per-epoch training/validation curves")
    best_epoch: int | None = None
    train_seconds: float | None = None
    selection: dict[str, Any] = Field(
        default_factory=dict, description="choices made on training patients (ensemble: inner scores, weights)")

    @property
    def target_scale(self) -> str:
        """What the predicted numbers are (the panel's transform of counts, never z-scores)."""
        return self.panel.transform

    @property
    def training_patients(self) -> list[str]:
        return sorted(set(self.training_samples.values()))

    def features(self, where: str | Path | None = None) -> tuple[EncoderSpec, PatchSpec, EmbedConfig]:
        """Encoder spec, patch spec and embedding recipe, or one error line when the card lacks them
        (a model fitted on arrays outside ``he2st train``/``benchmark`` cannot say how to make its inputs)."""
        if self.encoder is None or self.patch is None or self.embedding is None:
            raise He2stError(
                f"the {self.method} model card records no encoder/patch/embedding recipe (fitted outside "
                "`he2st train`?); it cannot be applied to new images", where)
        return self.encoder, self.patch, self.embedding

    def training_line(self) -> str:
        """One human-readable line: 'B4, C2 (patients B, C)'."""
        if not self.training_samples:
            return "unknown"
        return f"{', '.join(sorted(self.training_samples))} (patients {', '.join(self.training_patients)})"
