"""``ensemble``: a default that is never far from the best member, by construction.

Diverse members -- retrieval in raw feature space (``knn``), contrastive retrieval (``bleep``), a
regularised regression (``ridge_cv``) and contrastive retrieval with cell-type transfer and
query-time neighbour context (``carhe``, dropped where no cell-type proportions exist) -- are combined with non-negative weights chosen by cross-validation *over
the training patients only*: each member is fitted with one training patient held out and predicts
that patient; the held-out predictions of all inner folds are stacked and a non-negative linear
regression of the measured expression on them gives the weights (one set for all genes, or one per
gene). The members are then refitted on all training spots. The outer test patients are never seen:
this is the inner loop of nested cross-validation, run inside ``fit``.

Spatial context is chosen the same way: each member is tried with every ``context`` option (none,
the mean of its 6 nearest spots, that plus the 3x field around it) and keeps the one with the best
inner score, so whether context helps -- and how much -- is decided on the training patients of each
dataset, not by hand on one.

Inner folds hold out whole patients when the training spots come from at least two (the model card's
``training_samples`` says which sample belongs to whom), else whole samples; with a single sample
the members are weighted equally. A member that cannot run (say, CarHE without cell-type proportions)
is dropped with its reason, recorded with the weights and inner scores in ``TrainLog.selection``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.linear_model import LinearRegression

from he2st.data.splits import held_out_groups, validation_mask
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.bank import ReferenceBank
from he2st.methods.base import Method, MethodConfig, Prediction, TrainLog
from he2st.methods.neural import strip_prefix
from he2st.methods.registry import create_method, method_class, register_method
from he2st.stats import pearson_per_gene

CONTEXT_OPTIONS = ("context_neighbours", "context_field")


class EnsembleConfig(MethodConfig):
    """Members, their options, and how their weights are chosen (on training patients only)."""

    members: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "knn": {"method": "knn"},
            "bleep": {"method": "bleep"},
            "ridge_cv": {"method": "ridge_cv"},
            "carhe": {"method": "carhe"},
        },
        description="member label -> {method: registered name, other keys: that method's options}",
    )
    context: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}, {"context_neighbours": 6}, {"context_neighbours": 6, "context_field": True}],
        description="spatial context options tried for every member whose spec does not set them; each member "
        "keeps the one with the best inner cross-validated Pearson (6 neighbours: the first ring of a Visium grid)")
    weights: Literal["global", "per_gene"] = Field(
        "global", description="one non-negative weight per member for all genes, or one set per gene")
    inner_folds: int = Field(
        3, ge=2, le=10, description="most inner folds (training patients, or samples, are dealt into at most this many)")
    validation_fraction: float = Field(
        0.15, gt=0, lt=1, description="of each inner training set, for the members' early stopping")


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights of ``y ~ X`` (both centred); equal weights if all come out zero."""
    w = np.clip(LinearRegression(positive=True, fit_intercept=False).fit(X, y).coef_, 0, None)
    return w if w.sum() > 0 else np.full(X.shape[1], 1.0 / X.shape[1])


@register_method
class Ensemble(Method):
    """Members weighted by nested cross-validation over the training patients, refitted on all of them."""

    name = "ensemble"
    Config = EnsembleConfig

    def __init__(self, config: EnsembleConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if self.context_width > 1:
            raise He2stError("ensemble: set context_neighbours/context_field on its members, not on the ensemble")
        for label, spec in self.config.members.items():
            if "method" not in spec:
                raise He2stError(f"ensemble member {label!r} names no method")
            method_class(spec["method"])
        self.fitted: dict[str, Method] = {}
        self.weights = np.zeros((0, 0), np.float32)  # (genes or 1, members)
        self.intercepts = np.zeros(0, np.float32)

    @property
    def halo_hops(self) -> tuple[int, ...]:
        """As many hops as the deepest member, each as wide as the widest: covers every member's reads."""
        hops = [m.halo_hops for m in self._members().values()]
        depth, width = max(map(len, hops), default=0), max((k for h in hops for k in h), default=0)
        return (width,) * depth

    @property
    def reads_field(self) -> bool:
        return any(m.reads_field for m in self._members().values())

    def _members(self) -> dict[str, Method]:
        if self.fitted:
            return self.fitted
        return {label: self._create(label) for label in self.config.members}

    def _create(self, label: str, context: dict[str, Any] | None = None) -> Method:
        spec = dict(self.config.members[label]) | (context or {})
        method = create_method(spec.pop("method"), **({"seed": self.config.seed} | spec))
        method.card = self.card
        return method

    def _candidates(self, label: str) -> list[dict[str, Any]]:
        """The context options tried for a member: its own when its spec pins them, else ``context``."""
        spec = self.config.members[label]
        if any(key in spec for key in CONTEXT_OPTIONS):
            return [{}]
        return [dict(c) for c in self.config.context] or [{}]

    def _fit_member(self, label: str, context: dict[str, Any], spots: SpotSet, groups: np.ndarray) -> Method:
        val = validation_mask(spots.sample_ids, self.config.validation_fraction, seed=self.config.seed,
                              patients=groups)
        method = self._create(label, context)
        method.fit(spots.subset(~val), spots.subset(val))
        return method

    def _fit(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        spots = train if val is None else SpotSet.concat([train, val])
        groups = self.training_groups(spots)
        held_out = held_out_groups(groups, self.config.inner_folds)
        trials = [(label, i) for label in self.config.members for i in range(len(self._candidates(label)))]
        failed: dict[tuple[str, int], str] = {}
        inner: dict[tuple[str, int], list[float]] = {t: [] for t in trials}
        oof = {t: np.full(spots.targets.shape, np.nan, np.float32) for t in trials}
        for fold in held_out:
            test = np.isin(groups.astype(str), fold)
            for label, i in [t for t in trials if t not in failed]:
                try:
                    member = self._fit_member(label, self._candidates(label)[i], spots.subset(~test), groups[~test])
                    pred = member.predict(spots.subset(test)).expression
                except He2stError as exc:
                    failed[(label, i)] = str(exc)
                    continue
                oof[(label, i)][test] = pred
                inner[(label, i)].append(float(np.nanmean(pearson_per_gene(pred, spots.targets[test]))))
        # each member keeps its context candidate with the best mean inner score (the first without inner folds)
        chosen: dict[str, int] = {}
        dropped: dict[str, str] = {}
        for label in self.config.members:
            ok = [i for lb, i in trials if lb == label and (lb, i) not in failed]
            if not ok:
                dropped[label] = "; ".join(dict.fromkeys(failed[(label, i)] for lb, i in trials if lb == label))
            else:
                chosen[label] = max(ok, key=lambda i: np.mean(inner[(label, i)])) if held_out else ok[0]
        self._stack(spots, [oof[(lb, i)] for lb, i in chosen.items()], bool(held_out))
        kept = list(chosen)
        self.fitted = {}
        for label in kept:
            try:
                self.fitted[label] = self._fit_member(label, self._candidates(label)[chosen[label]], spots, groups)
            except He2stError as exc:
                dropped[label] = str(exc)
        if not self.fitted:
            raise He2stError(f"ensemble: no member could be fitted ({'; '.join(f'{k}: {v}' for k, v in dropped.items())})")
        self.weights = self.weights[:, [kept.index(lb) for lb in self.fitted]]
        log = TrainLog()
        log.selection = {
            "inner_folds": ["+".join(fold) for fold in held_out],
            "inner_pearson": {lb: inner[(lb, chosen[lb])] for lb in self.fitted},
            "context": {lb: self._candidates(lb)[chosen[lb]] for lb in self.fitted},
            "context_inner_pearson": {
                lb: {json.dumps(c, sort_keys=True): round(float(np.mean(inner[(lb, i)])), 4)
                     for i, c in enumerate(self._candidates(lb)) if inner[(lb, i)]}
                for lb in self.fitted},
            "weights": {lb: self.weights[:, i].round(4).tolist() for i, lb in enumerate(self.fitted)},
            "dropped": dropped,
        }
        return log

    def _stack(self, spots: SpotSet, predictions: list[np.ndarray], nested: bool) -> None:
        """Non-negative weights of the members' held-out predictions (equal weights without inner folds)."""
        y = spots.targets
        if not nested:
            self.weights = np.full((1, len(predictions)), 1.0 / len(predictions), np.float32)
            self.intercepts = np.zeros(y.shape[1], np.float32)
            return
        X = np.stack(predictions, axis=-1)  # (spots, genes, members)
        # what is scored is the pattern within each sample, so weights are fitted on within-sample
        # deviations: level shifts between samples (and patients) would otherwise drive them to zero
        Xc, yc = X.copy(), y.astype(np.float64)
        for sid in np.unique(np.asarray(spots.sample_ids).astype(str)):
            rows = np.asarray(spots.sample_ids).astype(str) == sid
            Xc[rows] -= X[rows].mean(0, keepdims=True)
            yc[rows] -= y[rows].mean(0, keepdims=True)
        if self.config.weights == "global":
            self.weights = _nnls(Xc.reshape(-1, X.shape[-1]), yc.reshape(-1))[None, :].astype(np.float32)
        else:
            self.weights = np.stack([_nnls(Xc[:, g], yc[:, g]) for g in range(y.shape[1])]).astype(np.float32)
        self.intercepts = (y.mean(0) - np.einsum("ngm,gm->g", X, np.broadcast_to(
            self.weights, (y.shape[1], X.shape[-1]))) / len(X)).astype(np.float32)

    def _predict(self, spots: SpotSet) -> Prediction:
        preds = np.stack([m.predict(spots).expression for m in self.fitted.values()], axis=-1)
        expression = (preds * self.weights[None]).sum(-1) + self.intercepts
        return Prediction(expression.astype(np.float32), list(self.panel.genes))

    # ------------------------------------------------------------------ persistence
    def layout(self) -> dict[str, Any]:
        return {"members": {lb: {"config": m.config.model_dump(mode="json"), "layout": m.layout()}
                            for lb, m in self.fitted.items()}}

    def state(self) -> dict[str, torch.Tensor]:
        state = {"weights": torch.from_numpy(self.weights), "intercepts": torch.from_numpy(self.intercepts)}
        for label, member in self.fitted.items():
            state |= {f"{label}.{k}": v for k, v in member.state().items()}
            if member.bank is not None:
                state |= {f"{label}.bank.{k}": torch.from_numpy(np.ascontiguousarray(v))
                          for k, v in (("embeddings", member.bank.embeddings), ("expression", member.bank.expression))}
        return state

    def load_state(self, state: dict[str, torch.Tensor], layout: dict[str, Any]) -> None:
        self.weights, self.intercepts = state["weights"].numpy(), state["intercepts"].numpy()
        self.fitted = {}
        for label, saved in layout["members"].items():
            method = self._create(label)
            method.config = type(method.config).model_validate(saved["config"])
            own = strip_prefix(state, label)
            method.load_state({k: v for k, v in own.items() if not k.startswith("bank.")}, saved["layout"])
            if "bank.embeddings" in own:
                method.bank = ReferenceBank(own["bank.embeddings"].numpy(), own["bank.expression"].numpy(),
                                            self.panel.genes, normalize=False)
            self.fitted[label] = method
