"""What every neural method shares, written once: the fit sequence, the mini-batch loop, and
save/load of modules and scalers with their sizes stored as JSON.

A method file then holds only what is its own: the sizes it needs (:meth:`NeuralMethod.sizes`), how
to build its modules from them (:meth:`NeuralMethod.build`), and its objective inside
:meth:`NeuralMethod.train_modules`. Loading a checkpoint rebuilds the modules from the stored sizes
-- never by guessing an architecture from tensor names.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import Method, MethodConfig, TrainLog
from he2st.methods.layers.features import FeatureScaler
from he2st.methods.layers.neighbourhood import spatial_neighbours
from he2st.stats import mean_sample_pearson

#: the validation score of an epoch whose predictions are not finite (or define no within-sample Pearson):
#: below any Pearson, so early stopping never keeps that epoch
WORST_VALIDATION_SCORE = -1.0


def has_validation(val: SpotSet | None) -> bool:
    """Whether ``val`` can steer early stopping: its score is a Pearson within a sample, which needs two spots
    of one sample (as a contrastive batch needs two spots)."""
    if val is None or len(val) < 2:
        return False
    _, counts = np.unique(np.asarray(val.sample_ids).astype(str), return_counts=True)
    return bool((counts > 1).any())


def validation_sample(n: int, cap: int | None, seed: int) -> np.ndarray | None:
    """Rows of a seeded sample of ``cap`` of ``n`` validation spots, ascending; None (all of them) when ``n <= cap``.
    Drawn once per fit, so every epoch scores the same spots and early stopping compares like with like."""
    if cap is None or n <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


@dataclass(frozen=True)
class ValidationSpots:
    """Validation spots as every epoch scores them, gathered once per fit: ``inputs`` holds the scored spots
    (expression removed) first, then the spots whose features they read as physical neighbours; ``scored``
    the scored spots themselves, with their measured values, samples and extras."""

    inputs: SpotSet
    scored: SpotSet


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix.``, with that prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


class NeuralMethod(Method):
    """Fit = check targets, seed, fit scalers on training spots, build modules from sizes, train them,
    then prepare prediction. Checkpoints hold every module in :attr:`module_attrs` and every scaler in
    :attr:`scaler_attrs`; :meth:`layout` records the sizes that rebuild them."""

    #: attributes holding the nn.Modules saved with the model
    module_attrs: ClassVar[tuple[str, ...]] = ("net",)
    #: attributes holding FeatureScalers (None when a run does not use one) saved with the model
    scaler_attrs: ClassVar[tuple[str, ...]] = ("scaler", "target_scaler")
    #: the method's config has ``standardize_targets``: z-score each gene with training statistics
    #: (``target_scaler``) before the model sees it, and map predictions back to the panel's scale
    scales_targets: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.dims: dict[str, int] = {}
        self.scaler = FeatureScaler()
        self.target_scaler: FeatureScaler | None = None

    # ------------------------------------------------------------------ what a method supplies
    def sizes(self, train: SpotSet) -> dict[str, int]:
        """The sizes its modules are built from, read from training spots (default: features and genes;
        ``input_dim``: the width of the scaled features the first layer reads, when they are projected)."""
        dims = {"image_dim": train.features.shape[1], "n_genes": train.targets.shape[1]}
        return dims if self.scaler.axes is None else dims | {"input_dim": self.scaler.dim}

    def input_components(self) -> int | None:
        """Principal axes the standardised features are projected on before the first layer (None: none)."""
        return None

    @abstractmethod
    def build(self, dims: dict[str, int], pretrained: bool = True) -> None:
        """Create the modules from ``dims`` (``pretrained=False`` when weights will come from a checkpoint)."""

    @abstractmethod
    def train_modules(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        """Train the built modules; ``val`` (or None) steers early stopping."""

    def fit_scalers(self, train: SpotSet) -> None:
        """Standardisation fitted on training spots only: the frozen features (projected on their top
        principal axes when :meth:`input_components` says so), and the targets when the method scales
        them (``scales_targets`` and its ``standardize_targets`` option)."""
        self.scaler = FeatureScaler().fit(train.features, self.input_components())
        scale = self.scales_targets and self.config.standardize_targets
        self.target_scaler = FeatureScaler().fit(train.targets) if scale else None

    def after_fit(self, train: SpotSet, val: SpotSet | None) -> None:
        """Prepare prediction once trained (retrieval methods build their bank here)."""

    def prepare_validation(self, train: SpotSet) -> None:
        """Make :meth:`_predict` usable mid-training from training spots alone (retrieval: a bank)."""

    def validation_rows(self, n: int) -> np.ndarray | None:
        """The rows of ``n`` validation spots that each epoch scores (None: all of them)."""
        return None

    def validation_pearson(self, train: SpotSet, val: SpotSet, rows: np.ndarray | None = None) -> float:
        """Mean per-gene Pearson of the method's own prediction for the validation spots (``rows`` of them:
        all when None), taken within each validation sample and averaged over the samples -- what the
        benchmark scores, so early stopping and checkpoint choice follow it, whatever the objective. A
        correlation pooled over several sections would also reward the level shifts between them, which the
        benchmark does not score."""
        return self.validation_score(train, self.validation_spots(train, val, rows))

    def validation_score(self, train: SpotSet, spots: ValidationSpots) -> float:
        """:meth:`validation_pearson` of validation spots gathered by :meth:`validation_spots`."""
        self.prepare_validation(train)
        scored = spots.scored
        try:
            r = mean_sample_pearson(self.validation_prediction(spots.inputs, len(scored)), scored.targets,
                                    scored.sample_ids)
        except He2stError:  # non-finite predictions
            return WORST_VALIDATION_SCORE
        return r if np.isfinite(r) else WORST_VALIDATION_SCORE

    def validation_spots(self, train: SpotSet, val: SpotSet, rows: np.ndarray | None = None) -> ValidationSpots:
        """The validation spots of ``rows`` (all when None) and, for a method that reads each spot's physical
        neighbours (``context_k``), the spots they read: their nearest spots among all spots of their
        sections, training spots included. Validation spots are a random share of the training sections when
        there are too few samples to hold out whole ones, and a section is predicted whole, so a validation
        spot's neighbours are the spots of its section, whichever set they fell in (as the context
        features' are), not only the other validation spots scattered over it. Only those neighbours are
        predicted with the scored spots, so an epoch's validation costs at most ``context_k + 1`` times the
        spots it scores, however large the sections."""
        scored = val if rows is None else val.subset(rows)
        inputs = scored.without_expression()
        if not self.context_k:
            return ValidationSpots(inputs, scored)
        shared = np.isin(np.asarray(train.sample_ids).astype(str), np.unique(np.asarray(val.sample_ids).astype(str)))
        sections = SpotSet.concat([val, train.subset(shared)]) if shared.any() else val
        index, valid = spatial_neighbours(sections.coords_um, sections.sample_ids, self.context_k)
        own = np.arange(len(val)) if rows is None else np.asarray(rows)
        read = np.setdiff1d(np.unique(index[own][valid[own]]), own)
        if len(read):
            inputs = SpotSet.concat([inputs, sections.subset(read).without_expression()])
        return ValidationSpots(inputs, scored)

    def validation_prediction(self, inputs: SpotSet, n: int) -> np.ndarray:
        """Predicted expression of the first ``n`` of ``inputs`` (the scored validation spots; the rest are
        the neighbours they read)."""
        return self._predict(inputs).expression[:n]

    def validation(self, train: SpotSet, val: SpotSet | None) -> Callable[[], float] | None:
        """The validation score callable for :func:`~he2st.methods.training.fit_minibatches` (None: no val);
        the rows it scores (:meth:`validation_rows`) and the neighbours they read are gathered here, once."""
        if val is None:
            return None
        spots = self.validation_spots(train, val, self.validation_rows(len(val)))
        return lambda: self.validation_score(train, spots)

    # ------------------------------------------------------------------ the shared sequence
    def _fit(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        if train.targets is None:
            raise He2stError(f"{self.name}: training spots need targets")
        torch.manual_seed(self.config.seed)
        self.fit_scalers(train)
        self.dims = self.sizes(train)
        self.build(self.dims)
        log = self.train_modules(train, val if has_validation(val) else None, unlabelled)
        self.after_fit(train, val)
        return log

    @property
    def feature_dim(self) -> int | None:
        return self.dims.get("image_dim")

    # ------------------------------------------------------------------ persistence
    def layout(self) -> dict[str, Any]:
        return {"dims": self.dims, "scalers": [a for a in self.scaler_attrs if getattr(self, a) is not None]}

    def modules(self) -> dict[str, nn.Module]:
        return {attr: getattr(self, attr) for attr in self.module_attrs}

    def state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for attr, module in self.modules().items():
            state |= {f"{attr}.{k}": v for k, v in module.state_dict().items()}
        for attr in self.layout()["scalers"]:
            state |= getattr(self, attr).state(attr)
        return state

    def load_state(self, state: dict[str, torch.Tensor], layout: dict[str, Any]) -> None:
        self.dims = dict(layout["dims"])
        self.build(self.dims, pretrained=False)
        for attr, module in self.modules().items():
            module.load_state_dict(strip_prefix(state, attr))
            module.eval()
        for attr in self.scaler_attrs:
            setattr(self, attr, FeatureScaler.from_state(state, attr) if attr in layout["scalers"] else None)
