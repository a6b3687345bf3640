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
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import Method, MethodConfig, TrainLog
from he2st.methods.layers.features import FeatureScaler
from he2st.stats import mean_sample_pearson


def has_validation(val: SpotSet | None) -> bool:
    """Whether ``val`` can steer early stopping (a contrastive batch needs two spots)."""
    return val is not None and len(val) > 1


def validation_sample(n: int, cap: int | None, seed: int) -> np.ndarray | None:
    """Rows of a seeded sample of ``cap`` of ``n`` validation spots, ascending; None (all of them) when ``n <= cap``.
    Drawn once per fit, so every epoch scores the same spots and early stopping compares like with like."""
    if cap is None or n <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


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
        self.prepare_validation(train)
        truth, samples = (val.targets, val.sample_ids) if rows is None else (val.targets[rows], val.sample_ids[rows])
        inputs = self.validation_inputs(train, val)
        if rows is None and len(inputs) > len(val):
            rows = np.arange(len(val))
        try:
            r = mean_sample_pearson(self.validation_prediction(inputs, rows), truth, samples)
        except He2stError:  # non-finite predictions: the worst score, so this epoch is never chosen
            return -1.0
        return r if np.isfinite(r) else -1.0

    def validation_inputs(self, train: SpotSet, val: SpotSet) -> SpotSet:
        """The validation spots as a prediction reads them, expression removed; for a method that reads each
        spot's physical neighbours (``context_k``), followed by the training spots of the validation samples.
        Validation spots are a random share of training samples when there are too few samples to hold out
        whole ones, and a section is predicted whole: a validation spot's neighbours are the spots of its
        section, whichever set they fell in (as the context features' are), not the other validation spots
        scattered over it."""
        inputs = val.without_expression()
        shared = np.isin(np.asarray(train.sample_ids).astype(str), np.unique(np.asarray(val.sample_ids).astype(str)))
        if not self.context_k or not shared.any():
            return inputs
        return SpotSet.concat([inputs, train.subset(shared).without_expression()])

    def validation_prediction(self, spots: SpotSet, rows: np.ndarray | None) -> np.ndarray:
        """Predicted expression of ``rows`` of the validation ``spots`` (all when None); a method that reads
        physical neighbours predicts every spot, so that the rows' neighbours are read."""
        if rows is None:
            return self._predict(spots).expression
        if self.context_k:
            return self._predict(spots).expression[rows]
        return self._predict(spots.subset(rows)).expression

    def validation(self, train: SpotSet, val: SpotSet | None) -> Callable[[], float] | None:
        """The validation score callable for :func:`~he2st.methods.training.fit_minibatches` (None: no val);
        the rows it scores (:meth:`validation_rows`) are chosen here, once."""
        if val is None:
            return None
        rows = self.validation_rows(len(val))
        return lambda: self.validation_pearson(train, val, rows)

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
