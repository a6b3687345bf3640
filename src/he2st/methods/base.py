"""The one interface every he2st method implements, baselines included.

A method is fitted on training spots (with a validation subset drawn from training patients),
predicts expression for spots it has never seen from their images alone, and saves to a single
checkpoint that holds only tensors and JSON text -- loaded with ``torch.load(weights_only=True)``,
so opening a checkpoint can never execute code.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.io import atomic_path

CHECKPOINT_FORMAT = 1


class MethodConfig(BaseModel):
    """Base of every method's options (documented field by field in each subclass)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0


@dataclass
class Prediction:
    """Predicted expression (N, G) in the panel's target scale, plus optional per-spot uncertainty."""

    expression: np.ndarray
    genes: list[str]
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. predicted cell-type proportions


@dataclass
class TrainLog:
    """Per-epoch curves and the chosen epoch (chosen on validation data, never on test)."""

    curves: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int | None = None
    seconds: float = 0.0

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.curves.setdefault(key, []).append(float(value))


class Method(ABC):
    """Fit on training spots, predict from images, save/load."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    stochastic: ClassVar[bool] = True  # False: results do not depend on the seed (no need to repeat)
    uses_bank: ClassVar[bool] = False  # retrieval methods: predictions come from a ReferenceBank
    uses_tokens: ClassVar[bool] = False  # training reads spots.tokens (cached token grids) when available

    def __init__(self, config: MethodConfig | None = None, **overrides: Any) -> None:
        base = config.model_dump() if config is not None else {}
        try:
            self.config = self.Config(**(base | overrides))
        except ValueError as exc:
            raise He2stError(f"invalid options for method {self.name!r}: {exc}") from exc
        self.panel: GenePanel | None = None
        self.encoder_spec: str = ""
        self.patch_spec: str = ""  # PatchSpec JSON of the patches the features came from
        self.embed_config: str = ""  # EmbedConfig JSON (encoder, weights, stain, TTA) of those features
        # gene sets chosen on the training spots (heg/hvg) and who the model was trained on
        self.gene_sets: dict[str, list[str]] = {}
        self.trained_on: dict[str, str] = {}  # sample id -> patient id

    # -------------------------------------------------------------- the interface
    @abstractmethod
    def fit(self, train: SpotSet, val: SpotSet | None = None) -> TrainLog:
        """Learn from training spots (``targets`` present). ``val`` only steers early stopping."""

    def predict(self, spots: SpotSet) -> Prediction:
        """Expression for spots from their image features only; expression-derived inputs are dropped."""
        if self.panel is None or (self.uses_bank and self.bank is None):
            raise He2stError(f"method {self.name} has not been fitted (or its reference bank file is missing)")
        self.check_spots(spots)
        return self._predict(spots.without_expression())

    @abstractmethod
    def _predict(self, spots: SpotSet) -> Prediction:
        """Method-specific prediction (``spots`` carries no targets)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """All learned arrays as tensors (what the checkpoint stores)."""

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state`."""

    # -------------------------------------------------------------- checkpoints
    bank: Any = None  # retrieval methods keep a ReferenceBank here; it is saved next to the checkpoint

    @staticmethod
    def bank_path(path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(path.stem + ".bank.h5")

    def save(self, path: str | Path) -> Path:
        """One file: format, method, config, gene panel, encoder spec, tensors."""
        if self.panel is None:
            raise He2stError(f"method {self.name} has not been fitted")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "method": self.name,
            "config": self.config.model_dump_json(),
            "panel": self.panel.model_dump_json(),
            "encoder_spec": self.encoder_spec,
            "patch_spec": self.patch_spec,
            "embed_config": self.embed_config,
            "gene_sets": json.dumps(self.gene_sets),
            "trained_on": json.dumps(self.trained_on),
            "state": {k: v.detach().cpu().contiguous() for k, v in self.state().items()},
        }
        path = Path(path)
        if self.bank is not None:
            self.bank.save(self.bank_path(path))
        elif self.bank_path(path).exists():
            self.bank_path(path).unlink()  # never pair this model with another model's bank
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(payload, tmp)
        return path

    def check_spots(self, spots: SpotSet) -> None:
        """Refuse spots whose features cannot be what the model was trained on."""
        expected = json.loads(self.encoder_spec).get("embed_dim") if self.encoder_spec else None
        if expected is not None and spots.features.shape[1] != expected:
            raise He2stError(
                f"model expects {expected}-d image features from encoder "
                f"{json.loads(self.encoder_spec)['name']!r}, got {spots.features.shape[1]}-d"
            )


def load_method(path: str | Path) -> Method:
    """Load any method's checkpoint safely (tensors and JSON only; pickled objects are refused)."""
    from he2st.methods.registry import method_class

    path = Path(path)
    if not path.exists():
        raise He2stError("checkpoint not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types for unsafe/corrupt files
        raise He2stError(f"refusing checkpoint: not a safe he2st checkpoint ({type(exc).__name__})", path) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or "method" not in payload:
        raise He2stError("not a he2st checkpoint (missing format/method)", path)
    cls = method_class(payload["method"])
    try:
        method = cls(cls.Config.model_validate_json(payload["config"]))
        method.panel = GenePanel.model_validate_json(payload["panel"])
        state = payload["state"]
    except (ValueError, KeyError, TypeError) as exc:
        raise He2stError(f"checkpoint does not match this he2st version ({type(exc).__name__}: {exc})"[:300], path) from exc
    method.encoder_spec = payload.get("encoder_spec", "")
    method.patch_spec = payload.get("patch_spec", "")
    method.embed_config = payload.get("embed_config", "")
    method.gene_sets = json.loads(payload.get("gene_sets", "{}"))
    method.trained_on = json.loads(payload.get("trained_on", "{}"))
    method.load_state(state)
    if Method.bank_path(path).exists():
        from he2st.predict.retrieval import ReferenceBank

        method.bank = ReferenceBank.load(Method.bank_path(path))
    return method
