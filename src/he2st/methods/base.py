"""The one interface every he2st method implements, baselines included.

A method is fitted on training spots (with a validation subset drawn from training patients),
predicts expression for spots it has never seen from their images alone, and saves to a single
checkpoint that holds only tensors and JSON text -- loaded with ``torch.load(weights_only=True)``,
so opening a checkpoint can never execute code. What a method needs from the pipeline is declared
as class capabilities (``uses_bank``, ``uses_tokens``, ``uses_patches``, ``context_k``), never sniffed.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import ValidationError

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.data.splits import validation_mask
from he2st.data.views import is_encoder_view
from he2st.errors import He2stError, one_line
from he2st.io import atomic_path, check_output
from he2st.methods.layers.bank import ReferenceBank
from he2st.methods.card import ModelCard
from he2st.methods.checkpoint import CHECKPOINT_FORMAT
from he2st.methods.configs.common import MethodConfig, merged_groups
from he2st.methods.inner_tasks import map_fits
from he2st.methods.layers.context import context_width, feature_views, views_width, with_context
from he2st.methods.layers.features import centred_within_samples
from he2st.methods.layers.neighbourhood import neighbour_sum
from he2st.methods.reliability import Reliability


@dataclass
class Prediction:
    """Predicted expression (N, G) in the panel's target scale, plus optional per-spot uncertainty."""

    expression: np.ndarray
    genes: list[str]
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)  # per spot (N,), e.g. ood_score
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. predicted cell-type proportions
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # per spot and gene (N, G): lower, upper


@dataclass
class TrainLog:
    """Per-epoch curves and the chosen epoch (chosen on validation data, never on test)."""

    curves: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int | None = None
    seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch's training pass (not validation)
    selection: dict[str, Any] = field(default_factory=dict)  # what a method chose on training data (ensemble)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.curves.setdefault(key, []).append(float(value))


class Method(ABC):
    """Fit on training spots, predict from images, save/load."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: one component switched off at a time (ablation row suffix -> option overrides); the benchmark
    #: runs them with ``--ablation``
    ablations: ClassVar[dict[str, dict[str, Any]]] = {}
    stochastic: ClassVar[bool] = True  # False: results do not depend on the seed (no need to repeat)
    uses_bank: ClassVar[bool] = False  # predictions come from a ReferenceBank (saved beside the checkpoint)
    uses_tokens: ClassVar[bool] = False  # training reads spots.tokens (cached token grids) when available
    #: options that change only how a fitted model predicts (a fitted model can be re-queried with other
    #: values, as the ensemble's selection does; training reads them only through its validation score)
    query_options: ClassVar[tuple[str, ...]] = ("smooth_neighbours",)
    bank: ReferenceBank | None = None  # set by methods with uses_bank
    #: predictions can come from any reference bank (:meth:`retrieve`), so genes beyond the panel too
    retrieves: ClassVar[bool] = False
    #: chooses among the views a run embeds (the ensemble's ``view_variants``): workflows pass it ``embed.views``
    chooses_views: ClassVar[bool] = False
    #: a second bank of the training spots returning genes beyond the panel (``<stem>.transcriptome.h5``)
    transcriptome_bank: ReferenceBank | None = None
    #: measured on inner patient folds (``he2st.methods.calibration``); adds intervals and OOD flags
    reliability: Reliability | None = None
    coverage: float = 0.9  # level of the intervals added to predictions when ``reliability`` is set

    def __init__(self, config: MethodConfig | None = None, **overrides: Any) -> None:
        # a group given in part (train: {...}) changes those options of ``config``'s group, not the whole group
        options = merged_groups(config.model_dump() if config is not None else {}, overrides)
        try:
            self.config = self.Config(**options)
        except ValidationError as exc:
            raise one_line(exc, f"method {self.name!r}: invalid option") from exc
        self.card: ModelCard | None = None

    # -------------------------------------------------------------- capabilities
    @property
    def uses_patches(self) -> bool:
        """Training reads raw patches (the image encoder is trained end to end)."""
        return bool(getattr(self.config, "finetune_encoder", False))

    @property
    def context_k(self) -> int:
        """Physically nearest spots of the same slide each prediction reads (0: spots are independent);
        chunked whole-slide prediction adds them to every chunk as a halo."""
        return 0

    @property
    def halo_hops(self) -> tuple[int, ...]:
        """Neighbour reads of one prediction, hop by hop: the smoothing of its output, the method's own
        (``context_k``), then the context features' (each neighbour's features carry the mean of its own
        neighbours). Chunked whole-slide prediction widens every chunk by these hops, so chunks predict as
        the whole slide."""
        return tuple(k for k in (self.config.smooth_neighbours, self.context_k, self.config.context_neighbours) if k)

    # -------------------------------------------------------------- the card
    @property
    def panel(self) -> GenePanel:
        if self.card is None:
            raise He2stError(f"method {self.name} has no model card (gene panel); set one before fitting")
        return self.card.panel

    @panel.setter
    def panel(self, panel: GenePanel) -> None:
        """Set the panel (a minimal card for models fitted on arrays outside the workflows)."""
        self.card = (ModelCard(method=self.name, panel=panel) if self.card is None
                     else self.card.model_copy(update={"panel": panel}))

    @property
    def learns_from_unlabelled(self) -> bool:
        """Whether :meth:`fit` uses image-only spots (``unlabelled``); others ignore them."""
        return False

    # -------------------------------------------------------------- the interface
    def fit(self, train: SpotSet, val: SpotSet | None = None, unlabelled: SpotSet | None = None) -> TrainLog:
        """Learn from training spots (``targets`` present). ``val`` only steers early stopping;
        ``unlabelled``: image-only spots (no expression; a held-out slide's own may be among them) for methods
        that learn from histology alone.
        Spatial context is added to the features here, the same way for every method (training and
        validation spots together, so a spot's neighbours are found whichever set they fell in); so is the
        centring of the targets within each sample (``within_sample``)."""
        if self.config.within_sample:
            train, val = self._level_free_sets(train, val)
        if self.context_width == 1:
            return self._fit(train, val, unlabelled)
        if val is not None and len(val):
            both = self.contextual(SpotSet.concat([train, val]))
            rows = np.arange(len(both))
            train, val = both.subset(rows < len(train)), both.subset(rows >= len(train))
        else:  # an empty validation set still takes the context: methods that pool it with train need its width
            train, val = self.contextual(train), None if val is None else self.contextual(val)
        return self._fit(train, val, None if unlabelled is None else self.contextual(unlabelled))

    @abstractmethod
    def _fit(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        """Method-specific training on features that already carry the configured context."""

    def predict(self, spots: SpotSet) -> Prediction:
        """Expression for spots from their image features only; expression-derived inputs are dropped."""
        if self.card is None or (self.uses_bank and self.bank is None):
            raise He2stError(f"method {self.name} has not been fitted (or its reference bank file is missing)")
        self.check_spots(spots)
        prediction = self.smoothed(self._predict(self.contextual(spots.without_expression())), spots)
        if self.reliability is not None and len(spots):
            self._annotate(prediction, spots.features)
        return prediction

    def level_free(self, expression: np.ndarray, sample_ids: np.ndarray | list[str]) -> np.ndarray:
        """``expression`` as this method learns it: centred within each sample under ``within_sample`` (then
        every bank a retrieval method builds, of any genes, holds the same deviations), else as it is.
        Centring rows again moves only each sample's level, never a spot's deviation within its sample, so
        expression the fit already centred can pass through here again."""
        if not self.config.within_sample:
            return expression
        return centred_within_samples(expression, np.asarray(sample_ids))

    def _level_free_sets(self, train: SpotSet, val: SpotSet | None) -> tuple[SpotSet, SpotSet | None]:
        """Training and validation targets centred within their samples together: validation spots are cut
        from the training samples, so a sample's mean is over both."""
        n = len(train)
        rows = [train] if val is None else [train, val]
        targets = self.level_free(np.concatenate([s.targets for s in rows]),
                                  np.concatenate([np.asarray(s.sample_ids) for s in rows]))
        return replace(train, targets=targets[:n]), None if val is None else replace(val, targets=targets[n:])

    def smoothed(self, prediction: Prediction, spots: SpotSet) -> Prediction:
        """``prediction`` with each spot's expression averaged with its ``smooth_neighbours`` physically nearest
        spots' (same slide): expression varies smoothly across tissue while an image-based prediction carries
        per-spot noise, so averaging neighbours trades a little spatial detail for less noise."""
        k = self.config.smooth_neighbours
        if not k or not len(spots):
            return prediction
        total, count = neighbour_sum(prediction.expression, spots.coords_um, spots.sample_ids, k)
        prediction.expression = ((prediction.expression + total) / (1 + count)).astype(np.float32)
        return prediction

    def _annotate(self, prediction: Prediction, features: np.ndarray) -> None:
        """Add the reliability's intervals (panel genes) and out-of-distribution scores to ``prediction``."""
        out = self.reliability.annotate(prediction.expression, features, self.coverage)
        prediction.layers |= {"lower": out.pop("lower"), "upper": out.pop("upper")}
        prediction.uncertainty |= out

    def out_of_fold(self, spots: SpotSet, groups: np.ndarray, folds: list[np.ndarray],
                    validation_fraction: float = 0.15, beyond: np.ndarray | None = None,
                    beyond_genes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Predictions (N, G) of ``spots`` (with targets), each made by a copy of this method fitted without
        its fold's groups -- with its own validation draw, as a fit on all spots draws one. With ``beyond``
        (N, B: the spots' values of ``beyond_genes``, outside the panel) a retrieval method's copies also
        retrieve those genes from banks of their own training spots: the second array (else None)."""
        oof = np.full(spots.targets.shape, np.nan, np.float32)
        extra = None if beyond is None or not self.retrieves else np.full(beyond.shape, np.nan, np.float32)
        labels = np.asarray(groups).astype(str)
        tests = [np.isin(labels, fold) for fold in folds]
        arguments = []
        for test in tests:
            copy_ = type(self)(self.config)
            copy_.card = self.card
            val = validation_mask(spots.sample_ids[~test], validation_fraction, seed=self.config.seed,
                                  patients=labels[~test])
            arguments.append((copy_, spots, test, val, None if extra is None else (beyond, list(beyond_genes))))
        for test, (predicted, retrieved) in zip(tests, map_fits(fit_and_predict, arguments), strict=True):
            oof[test] = predicted
            if extra is not None:
                extra[test] = retrieved
        return oof, extra

    def transcriptome_reference(self, spots: SpotSet, expression: np.ndarray, genes: list[str]) -> ReferenceBank:
        """A bank of the fitted model's reference ``spots`` (with targets) that returns ``expression`` (their
        values of ``genes``, beyond the panel) -- for methods that predict by retrieval (``retrieves``)."""
        raise He2stError(f"method {self.name} does not predict by retrieval, so it cannot return genes beyond its "
                         "panel; use a retrieval method (knn, bleep, cmrcnet, carhe)")

    def retrieve(self, spots: SpotSet, bank: ReferenceBank) -> Prediction:
        """The profiles of ``bank`` retrieved for the images of ``spots`` (methods that ``retrieves``)."""
        raise He2stError(f"method {self.name} does not predict by retrieval")

    @abstractmethod
    def _predict(self, spots: SpotSet) -> Prediction:
        """Method-specific prediction (``spots`` carries no targets, its features carry the context)."""

    def training_groups(self, spots: SpotSet) -> np.ndarray:
        """What inner cross-validation holds out: the patient of each spot when the model card says and
        there are two or more patients, else its sample (a patient's sections are never split)."""
        samples = np.asarray(spots.sample_ids).astype(str)
        patients = self.card.training_samples if self.card is not None else {}
        if patients and all(s in patients for s in set(samples)):
            by_patient = np.array([patients[s] for s in samples])
            if len(set(by_patient)) >= 2:
                return by_patient
        return samples

    # -------------------------------------------------------------- spatial context
    @property
    def context_width(self) -> int:
        """How many embedding blocks the method's input features span (1: the spot alone)."""
        return context_width(self.config.context_neighbours, self.views)

    @property
    def views(self) -> list[str]:
        """The spot's other views (:mod:`he2st.data.views`) appended to its features, in order."""
        return feature_views(self.config.context_field, self.config.views)

    @property
    def reads_views(self) -> list[str]:
        """Every view a fit or a prediction of this method may read (whole-slide prediction embeds them,
        workflows load them)."""
        return self.views

    @property
    def predicts_whole_samples(self) -> bool:
        """Whether a spot's prediction depends on the other spots of its sample (say, each slide's own
        per-gene scale): whole-slide prediction then predicts every spot of the slide together."""
        return False

    def contextual(self, spots: SpotSet) -> SpotSet:
        """``spots`` with the configured context appended to their features."""
        return with_context(spots, self.config.context_neighbours, self.views, self.name)

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """All learned arrays as tensors (what the checkpoint stores)."""

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor], layout: dict[str, Any]) -> None:
        """Inverse of :meth:`state`; ``layout`` is what :meth:`layout` returned when it was saved."""

    def layout(self) -> dict[str, Any]:
        """JSON-serialisable sizes and structure needed to rebuild the modules before loading tensors."""
        return {}

    # -------------------------------------------------------------- checkpoints
    @staticmethod
    def bank_path(path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(path.stem + ".bank.h5")

    @staticmethod
    def transcriptome_path(path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(path.stem + ".transcriptome.h5")

    def save(self, path: str | Path) -> Path:
        """One file: format, method, config, model card, layout (JSON), tensors; the banks beside it."""
        if self.card is None:
            raise He2stError(f"method {self.name} has not been fitted")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "method": self.name,
            "config": self.config.model_dump_json(),
            "card": self.card.model_dump_json(),
            "layout": json.dumps(self.layout()),
            "state": {k: v.detach().cpu().contiguous() for k, v in self.state().items()},
        }
        if self.reliability is not None:
            payload["reliability"] = {"layout": json.dumps(self.reliability.layout()),
                                      "state": self.reliability.state()}
        path = Path(path)
        check_output(path)  # before the bank is written or removed: both are refused unless he2st's own
        check_output(self.bank_path(path))
        check_output(self.transcriptome_path(path))
        banks = {"bank": (self.bank, self.bank_path(path)),
                 "transcriptome": (self.transcriptome_bank, self.transcriptome_path(path))}
        token = uuid.uuid4().hex  # the checkpoint names the banks saved with it: another's is refused on load
        payload["banks"] = {key: None if bank is None else token for key, (bank, _) in banks.items()}
        with contextlib.ExitStack() as written:  # every file complete before any is renamed into place
            for bank, bank_path in banks.values():
                if bank is not None:
                    bank.write(written.enter_context(atomic_path(bank_path, suffix=bank_path.suffix)), token)
            with atomic_path(path, suffix=".pt") as tmp:
                torch.save(payload, tmp)
        for bank, bank_path in banks.values():
            if bank is None and bank_path.exists():
                bank_path.unlink()  # another model's bank: this checkpoint never reads it
        return path

    @property
    def feature_dim(self) -> int | None:
        """Width of the image features the model was fitted on (None: not fitted)."""
        return None

    def check_spots(self, spots: SpotSet) -> None:
        """Refuse spots whose features cannot be what the model was trained on (spots lacking a view the
        model reads are refused, naming the view, when it is appended). The field and tiles views come
        from the spot's own encoder, so they are as wide as its features; an encoder view has its width."""
        if self.uses_patches or self.feature_dim is None or any(v not in spots.views for v in self.views):
            return  # the encoder is part of the model (features are not its input), or a view is missing
        others = [v for v in self.views if is_encoder_view(v)]
        blocks = self.context_width - len(others)  # spot, neighbour mean, field and tiles: the spot's width
        expected = (self.feature_dim - views_width(spots, others)) // blocks
        got = spots.features.shape[1] * blocks + views_width(spots, others)
        if spots.features.shape[1] == expected and got != self.feature_dim:
            raise He2stError(f"model expects {self.feature_dim}-d features with its views ({', '.join(self.views)}), "
                             f"got {got}-d")
        if spots.features.shape[1] != expected:
            encoder = self.card.encoder if self.card is not None else None
            source = f" from encoder {encoder.name!r}" if encoder is not None else ""
            raise He2stError(f"model expects {expected}-d image features{source}, got {spots.features.shape[1]}-d")


def fit_and_predict(method: Method, spots: SpotSet, test: np.ndarray, val: np.ndarray,
                    beyond: tuple[np.ndarray, list[str]] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One inner fold of :meth:`Method.out_of_fold`: ``method`` fitted on the spots outside ``test``
    (early-stopped on the rows ``val`` of those), its predictions of the ``test`` rows, and with ``beyond``
    (every spot's values of genes outside the panel, and those genes) the same genes retrieved for them
    from a bank of the fitted spots (else None). The spots are cut here, so a fold's copies live only while
    it runs."""
    inner = spots.subset(~test)
    method.fit(inner.subset(~val), inner.subset(val))
    held_out = spots.subset(test)
    predicted = method.predict(held_out).expression
    if beyond is None:
        return predicted, None
    values, genes = beyond
    return predicted, method.retrieve(held_out, method.transcriptome_reference(inner, values[~test], genes)).expression
