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

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.patches import MAX_UPSAMPLE, PatchSpec, allowed_upsampling
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
    encoder_adaptation: dict[str, Any] = Field(
        default_factory=dict, description="how `he2st adapt` made the encoder weights from images (empty: not adapted)")
    adapted_views: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="adapted views read ('adapted', 'adapted-<recipe>') -> weights file, sha256, "
        "how `he2st adapt` made them (empty: none)")
    view_encoders: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="encoder views read: view -> encoder name, weights and their sha256 (empty: none)")
    patch: PatchSpec | None = Field(None, description="how the patches behind those features were cut")
    embedding: EmbedConfig | None = Field(None, description="stain, TTA, precision and weights of the features")
    gene_sets: dict[str, list[str]] = Field(default_factory=dict, description="HEG/HVG sets chosen on training spots")
    training_samples: dict[str, str] = Field(default_factory=dict, description="sample id -> patient id")
    training_pixel_size_um: dict[str, float] = Field(
        default_factory=dict, description="sample id -> µm/px of its slide (empty: not recorded)")
    curves: dict[str, list[float]] = Field(default_factory=dict, description="per-epoch training/validation curves")
    best_epoch: int | None = None
    train_seconds: float | None = None
    selection: dict[str, Any] = Field(
        default_factory=dict, description="choices made on training patients (ensemble: inner scores, weights)")
    reliability: dict[str, Any] = Field(
        default_factory=dict, description="predictability measured on inner patient folds of the training data")
    transcriptome: dict[str, Any] = Field(
        default_factory=dict, description="genes beyond the panel its transcriptome bank returns: threshold, count")
    tissue: str = Field("", description="tissue, disease and platform of the training samples: the intended use")
    command: str = Field("", description="the command that trained the model")

    @property
    def target_scale(self) -> str:
        """What the predicted numbers are (the panel's transform of counts, never z-scores)."""
        return self.panel.transform

    @property
    def training_patients(self) -> list[str]:
        return sorted(set(self.training_samples.values()))

    @property
    def training_mpp(self) -> list[float]:
        """The training slides' µm/px (empty when not recorded): how coarse a slide ``he2st predict`` accepts."""
        return list(self.training_pixel_size_um.values())

    def features(self, where: str | Path | None = None) -> tuple[EncoderSpec, PatchSpec, EmbedConfig]:
        """Encoder spec, patch spec and embedding recipe, or one error line when the card lacks them
        (a model fitted on arrays outside ``he2st train``/``benchmark`` cannot say how to make its inputs)."""
        if self.encoder is None or self.patch is None or self.embedding is None:
            raise He2stError(
                f"the {self.method} model card records no encoder/patch/embedding recipe (fitted outside "
                "`he2st train`?); it cannot be applied to new images", where)
        return self.encoder, self.patch, self.embedding

    def describe(self) -> list[tuple[str, str]]:
        """The card as (field, text) lines for a person (`he2st card`): training data, intended tissue,
        encoder and weights checksum, inputs, panel and the scores known at training time, with their command."""
        lines = [("model", f"{self.method} (he2st {self.he2st_version}, trained {self.created})"),
                 ("trained on", self.training_line()),
                 ("intended tissue", self.tissue or "not stated (set tissue=... when training)")]
        if self.encoder is not None:
            lines.append(("encoder", f"{self.encoder.name} ({self.encoder.embed_dim}-d), weights {self.encoder.weights}, "
                                     f"sha256 {self.weights_sha256 or 'not computed'}"))
        if self.encoder_adaptation:
            lines.append(("encoder adaptation", self._adaptation_line()))
        if self.adapted_views:
            lines.append(("adapted views", "; ".join(
                f"{view}: weights {rec.get('weights')}, sha256 {rec.get('weights_sha256') or 'not computed'}"
                for view, rec in self.adapted_views.items())))
        if self.view_encoders:
            lines.append(("view encoders", "; ".join(
                f"{view}: weights {rec.get('weights')}, sha256 {rec.get('weights_sha256') or 'not computed'}"
                for view, rec in self.view_encoders.items())))
        if self.patch is not None and self.embedding is not None:
            lines.append(("inputs", f"{self.patch.field_um:g} µm patches at {self.patch.size_px} px "
                                    f"({self.patch.pixel_size_um:g} µm/px), stain {self.embedding.stain}, "
                                    f"TTA {self.embedding.tta}"))
        lines.append(("training µm/px", self._resolution_line()))
        genes = list(self.panel.genes)
        lines.append(("panel", f"{len(genes)} genes on the {self.panel.transform} scale: {', '.join(genes[:8])}"
                               f"{', ...' if len(genes) > 8 else ''}"))
        if self.transcriptome:
            tx = self.transcriptome
            lines.append(("transcriptome", f"{tx['n_genes']} genes retrievable beyond the panel (mean training "
                                           f"{self.panel.transform} >= {tx['threshold']:g}): `he2st predict --genes` "
                                           "or `--transcriptome`"))
        lines.append(("known scores", self._scores_line()))
        lines.append(("reliability", self._reliability_line()))
        lines.append(("command", self.command or "not recorded"))
        return lines

    def _adaptation_line(self) -> str:
        """How the encoder weights were adapted to the study's patches (self-supervised, no expression read)."""
        a, options = self.encoder_adaptation, self.encoder_adaptation.get("options", {})
        samples = sorted(a.get("samples", {}))
        blocks = options.get("train_blocks")
        return (f"{a.get('objective')} on the patches of {len(samples)} samples ({', '.join(samples)}), images only; "
                f"{options.get('epochs')} epochs of {a.get('patches_per_epoch')} patches, "
                f"{'all blocks' if blocks is None else f'last {blocks} blocks'}, seed {options.get('seed')}, "
                f"from {a.get('base_encoder', {}).get('weights')}")

    def _resolution_line(self) -> str:
        """The training slides' pixel sizes and the upsampling ``he2st predict`` allows by default."""
        mpp = sorted(self.training_mpp)
        if not mpp:
            return f"not recorded: predict allows {MAX_UPSAMPLE:g}x upsampling"
        seen = (f"{mpp[0]:g}" if mpp[0] == mpp[-1]
                else f"{mpp[0]:g}-{mpp[-1]:g} (median {float(np.median(mpp)):g})")
        if self.patch is None:
            return seen
        return f"{seen}: predict allows {allowed_upsampling(self.patch, mpp):.3g}x upsampling"

    def _scores_line(self) -> str:
        """What training measured on held-out spots of its own patients (no test data is ever seen)."""
        parts = []
        val = self.curves.get("val_pearson")
        if val:
            best = self.best_epoch if self.best_epoch is not None else int(max(range(len(val)), key=val.__getitem__))
            parts.append(f"validation Pearson {max(val):.3f} (mean per-gene r on held-out spots of the training "
                         f"patients, epoch {best})")
        if "combination" in self.selection:
            parts.append(f"ensemble chosen on inner folds of the training patients: {self.selection['combination']}"
                         + self._member_shares())
        return "; ".join(parts) or "none recorded (score it with `he2st evaluate` on held-out patients)"

    def _member_shares(self) -> str:
        """Each ensemble member's median share of the per-gene weights, e.g. ', median shares knn 0.52, bleep 0.13'
        (the weights themselves, one per gene and member, are in ``selection``)."""
        weights = self.selection.get("weights")
        if not weights:
            return ""
        table = np.array([np.broadcast_to(np.asarray(w, float), (max(map(np.size, weights.values())),))
                          for w in weights.values()])  # (members, genes)
        shares = np.median(table / np.maximum(table.sum(0, keepdims=True), 1e-12), axis=1)
        return ", median shares " + ", ".join(f"{m} {s:.2f}" for m, s in zip(weights, shares, strict=True))

    def _reliability_line(self) -> str:
        """Expected accuracy on a new patient, as the inner patient folds measured it."""
        r = self.reliability
        if not r:
            return ("not estimated (by default with 3 or more training patients or samples; `he2st train --set "
                    "reliability=true` estimates it from 2): predictions carry no intervals or OOD flags")
        return (f"on held-out {r['units']} ({', '.join(r['held_out'])}; {r['sections']} sections) mean expected "
                f"r {r['mean_expected_r']:.3f}; {r['genes_expected_r_above_0.3']} genes above 0.3, "
                f"{r['genes_lower_bound_above_0.1']} with a 90% lower bound above 0.1; most predictable: "
                f"{', '.join(r['most_predictable'])}"
                + "".join(f"; signature {name} score expected r {v['expected_r']:.2f} (90% lower bound "
                          f"{v['expected_r_low']:.2f}), calls at {v['threshold']:.3g} precision {v['precision']:.2f}"
                          for name, v in r.get("scores", {}).items()))

    def training_line(self) -> str:
        """One human-readable line: 'B4, C2 (patients B, C)'."""
        if not self.training_samples:
            return "unknown"
        return f"{', '.join(sorted(self.training_samples))} (patients {', '.join(self.training_patients)})"
