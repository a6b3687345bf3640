"""Self-supervised adaptation of an encoder to a study's own H&E patches: the options and the record.

ImageNet encoders see H&E as unusual photographs. Training the last blocks on the study's own patches,
without any label, moves their features towards what varies in that tissue (:mod:`he2st.encoders.simsiam`
trains them; :mod:`he2st.workflows.adapt` reads a work folder's patch caches and writes the weights). Only
pixels are read: the expression of the samples is never touched, so the slides to be predicted may take
part. The weights file has a JSON record beside it (:func:`sidecar_path`) that the model card copies.
This module needs no torch, so a run configuration can name these options cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

OBJECTIVE = "simsiam"


class AdaptConfig(BaseModel):
    """How the encoder is adapted. Everything here is recorded beside the weights and in the model card."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, description="passes over the patches drawn for each epoch")
    batch_size: int = Field(32, ge=2, description="patches per step (each seen in two views)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the trained blocks (10x for the projector and "
                                              "predictor)")
    train_blocks: int | None = Field(
        2, ge=1, description="train the encoder's last N blocks and the layers after them; null: the whole encoder")
    max_patches: int | None = Field(
        2000, ge=2, description="patches drawn (seeded, without replacement) for each epoch; null: every patch")
    neighbours: float = Field(
        0.5, ge=0, le=1, description="chance that the second view is an adjacent spot's patch, not the same patch; "
        "0: off")
    seed: int = Field(0, description="seed of the patch order, the views and the projector's initial values")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ... (results are reproducible on a CPU)")


def sweep_recipes(base: AdaptConfig, changes: list[dict[str, Any]]) -> list[AdaptConfig]:
    """The recipes of a sweep: ``base`` with each of ``changes`` applied (``base`` alone when there are none),
    each recipe once. Each adaptation is a view of its own, so the ensemble's nested selection, not the user,
    chooses among them per dataset. A change naming an unknown option or a bad value raises ValueError naming
    its entry (pydantic reports it as the setting's one line)."""
    out: list[AdaptConfig] = []
    for i, change in enumerate(changes or [{}], 1):
        try:
            config = AdaptConfig.model_validate(base.model_dump() | change)
        except ValidationError as exc:
            first = exc.errors()[0]
            option = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"entry {i}, {option}: {' '.join(str(first['msg']).split())}") from exc
        if config not in out:
            out.append(config)
    return out


def sidecar_path(weights: str | Path) -> Path:
    """The JSON record written beside adapted weights: ``<weights>.json``."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".json")


def adaptation_record(weights: str | Path, sha256: str | None) -> dict[str, Any]:
    """The recipe recorded beside a weights file, when there is one that vouches for these weights (its
    ``weights_sha256`` equals ``sha256``); else empty: the weights were not adapted by he2st, or differ from those the record describes."""
    path = sidecar_path(weights)
    if sha256 is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("weights_sha256") == sha256 else {}
