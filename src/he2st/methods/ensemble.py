"""``ensemble``: a default that is never far from the best member, by construction.

Diverse members -- retrieval in raw feature space (``knn``), contrastive retrieval (``bleep``), the
same with query-time neighbour context (``bleep`` with ``query_neighbours``), and a regularised
regression (``ridge_cv``) -- are combined with non-negative weights chosen by cross-validation *over
the training patients only*: each member is fitted with one training patient held out and predicts
that patient; the held-out predictions of all inner folds are stacked and a non-negative linear
regression of the measured expression on them gives the weights (one set for all genes, or one per
gene). The members are then refitted on all training spots. The outer test patients are never seen:
this is the inner loop of nested cross-validation, run inside ``fit``.

Inner folds hold out whole patients when the training spots come from at least two (the model card's
``training_samples`` says which sample belongs to whom), else whole samples; with a single sample
the members are weighted equally. A member that cannot run (say, CarHE without cell-type proportions)
is dropped with its reason, recorded with the weights and inner scores in ``TrainLog.selection``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.linear_model import LinearRegression

from he2st.data.splits import validation_mask
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.bank import ReferenceBank
from he2st.methods.base import Method, MethodConfig, Prediction, TrainLog
from he2st.methods.neural import strip_prefix
from he2st.methods.registry import create_method, method_class, register_method
from he2st.stats import pearson_per_gene


class EnsembleConfig(MethodConfig):
    """Members, their options, and how their weights are chosen (on training patients only)."""

    members: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "knn": {"method": "knn"},
            "bleep": {"method": "bleep"},
            "bleep_context": {"method": "bleep", "query_neighbours": 6},
            "ridge_cv": {"method": "ridge_cv"},
        },
        description="member label -> {method: registered name, other keys: that method's options}",
    )
    weights: Literal["global", "per_gene"] = Field(
        "global", description="one non-negative weight per member for all genes, or one set per gene")
    validation_fraction: float = Field(
        0.15, gt=0, lt=1, description="of each inner training set, for the members' early stopping")


def _nnls(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative weights (and a free intercept) of ``y ~ X``; equal weights if all come out zero."""
    fit = LinearRegression(positive=True).fit(X, y)
    w = np.clip(fit.coef_, 0, None)
    if w.sum() <= 0:
        w = np.full(X.shape[1], 1.0 / X.shape[1])
        return w, float(y.mean() - X.mean(0) @ w)
    return w, float(fit.intercept_)


@register_method
class Ensemble(Method):
    """Members weighted by nested cross-validation over the training patients, refitted on all of them."""

    name = "ensemble"
    Config = EnsembleConfig

    def __init__(self, config: EnsembleConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        for label, spec in self.config.members.items():
            if "method" not in spec:
                raise He2stError(f"ensemble member {label!r} names no method")
            method_class(spec["method"])
        self.fitted: dict[str, Method] = {}
        self.weights = np.zeros((0, 0), np.float32)  # (genes or 1, members)
        self.intercepts = np.zeros(0, np.float32)

    @property
    def context_k(self) -> int:
        return max((m.context_k for m in self._members().values()), default=0)

    def _members(self) -> dict[str, Method]:
        if self.fitted:
            return self.fitted
        return {label: self._create(label) for label in self.config.members}

    def _create(self, label: str) -> Method:
        spec = dict(self.config.members[label])
        method = create_method(spec.pop("method"), **({"seed": self.config.seed} | spec))
        method.card = self.card
        return method

    def _groups(self, spots: SpotSet) -> np.ndarray:
        """Patient of each spot when the card says, and there are two or more; else its sample."""
        samples = np.asarray(spots.sample_ids).astype(str)
        patients = self.card.training_samples if self.card is not None else {}
        if patients and all(s in patients for s in set(samples)):
            by_patient = np.array([patients[s] for s in samples])
            if len(set(by_patient)) >= 2:
                return by_patient
        return samples

    def _fit_member(self, label: str, spots: SpotSet, groups: np.ndarray) -> Method:
        val = validation_mask(spots.sample_ids, self.config.validation_fraction, seed=self.config.seed,
                              patients=groups)
        method = self._create(label)
        method.fit(spots.subset(~val), spots.subset(val))
        return method

    def fit(self, train: SpotSet, val: SpotSet | None = None) -> TrainLog:
        spots = train if val is None else SpotSet.concat([train, val])
        groups = self._groups(spots)
        log = TrainLog()
        labels = list(self.config.members)
        dropped: dict[str, str] = {}
        inner: dict[str, list[float]] = {label: [] for label in labels}
        oof = {label: np.full(spots.targets.shape, np.nan, np.float32) for label in labels}
        held_out = sorted(set(groups)) if len(set(groups)) >= 2 else []
        for group in held_out:
            test = groups == group
            for label in [lb for lb in labels if lb not in dropped]:
                try:
                    member = self._fit_member(label, spots.subset(~test), groups[~test])
                    pred = member.predict(spots.subset(test)).expression
                except He2stError as exc:
                    dropped[label] = str(exc)
                    continue
                oof[label][test] = pred
                inner[label].append(float(np.nanmean(pearson_per_gene(pred, spots.targets[test]))))
        kept = [lb for lb in labels if lb not in dropped]
        if held_out:
            X = np.stack([oof[lb] for lb in kept], axis=-1)  # (spots, genes, members)
            y = spots.targets
            if self.config.weights == "global":
                centred = X - X.mean(0, keepdims=True)
                w, _ = _nnls(centred.reshape(-1, len(kept)), (y - y.mean(0)).reshape(-1))
                self.weights = w[None, :].astype(np.float32)
                self.intercepts = (y.mean(0) - X.mean(0) @ w).astype(np.float32)
            else:
                fits = [_nnls(X[:, g], y[:, g]) for g in range(y.shape[1])]
                self.weights = np.stack([w for w, _ in fits]).astype(np.float32)
                self.intercepts = np.array([b for _, b in fits], np.float32)
        else:
            self.weights = np.full((1, len(kept)), 1.0 / len(kept), np.float32)
            self.intercepts = np.zeros(spots.targets.shape[1], np.float32)
        self.fitted = {}
        for label in list(kept):
            try:
                self.fitted[label] = self._fit_member(label, spots, groups)
            except He2stError as exc:
                dropped[label] = str(exc)
        if not self.fitted:
            raise He2stError(f"ensemble: no member could be fitted ({'; '.join(f'{k}: {v}' for k, v in dropped.items())})")
        keep = [kept.index(lb) for lb in self.fitted]
        self.weights = self.weights[:, keep]
        log.selection = {
            "inner_folds": [str(g) for g in held_out], "inner_pearson": {lb: inner[lb] for lb in self.fitted},
            "weights": {lb: self.weights[:, i].round(4).tolist() for i, lb in enumerate(self.fitted)},
            "dropped": dropped,
        }
        return log

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
