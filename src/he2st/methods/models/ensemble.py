"""``ensemble``: a default that is never far from the best member, by construction.

Diverse members (``knn``, ``bleep``, ``ridge_cv``, ``carhe``) are combined with non-negative weights
chosen by cross-validation over the training patients only -- the inner loop of nested cross-validation,
run inside ``fit`` -- and then refitted on all training spots. When the inner folds select, every other
registered method within ``cost_budget`` (``candidates``) is tried beside them and stacked with them, so
the best single method of a dataset can take part; a method the stacking gives no weight is left out.
Each member's spatial context (neighbours, the field, and each view of ``view_variants``: by default every
view the training spots carry; workflows pass the run's ``embed.views``), and whether it trains within each
sample (``within_sample``), is chosen on the same inner folds by the one-standard-error rule. Members'
predictions are standardised per gene within each predicted sample before they are weighted
(``scale_within``). With fewer than ``min_selection_folds`` inner folds nothing is
chosen: each member runs as configured, with an equal say.
What was chosen is recorded in ``TrainLog.selection``; docs/methods/ensemble.md tells the whole procedure.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from he2st.data.splits import held_out_groups, validation_mask
from he2st.data.spots import SpotSet
from he2st.data.views import FIELD
from he2st.errors import He2stError
from he2st.methods.base import Method, Prediction, TrainLog
from he2st.methods.configs.ensemble import EnsembleConfig
from he2st.methods.inner_tasks import map_fits, runs_in_parallel
from he2st.methods.layers.bank import ReferenceBank
from he2st.methods.neural import strip_prefix
from he2st.methods.registry import METHODS, create_method, list_methods, method_class, register_method
from he2st.methods.stacking import Combination, Mode, fit_combination
from he2st.stats import mean_sample_pearson, one_standard_error_choice

CONTEXT_OPTIONS = ("context_neighbours", "context_field", "views", "within_sample")


def _sample_codes(sample_ids: list[str]) -> tuple[list[str], list[int]]:
    """A bank's sample ids as a checkpoint keeps them: the samples in order of appearance (layout) and
    each row's index among them (a tensor)."""
    names = list(dict.fromkeys(sample_ids))
    index = {sid: i for i, sid in enumerate(names)}
    return names, [index[sid] for sid in sample_ids]


@dataclass
class InnerPredictions:
    """The inner folds of a fit and the ensemble's held-out predictions on them, row by row."""

    folds: list[list[str]]
    sample_ids: np.ndarray
    barcodes: np.ndarray
    predictions: np.ndarray

    def matches(self, spots: SpotSet, folds: list[np.ndarray]) -> bool:
        """Whether ``spots`` are these rows, in this order, and ``folds`` these folds."""
        return (self.folds == [[str(g) for g in fold] for fold in folds]
                and np.array_equal(np.asarray(spots.sample_ids), self.sample_ids)
                and np.array_equal(np.asarray(spots.barcodes), self.barcodes))


@dataclass
class MemberFit:
    """A member's fit run as a task (:func:`fit_member`): its predictions of held-out spots under each query
    option (an inner fold; those made before a failure), or the fitted member (a refit); its fitting time;
    why it failed ('' if it did not)."""

    predictions: list[np.ndarray] = field(default_factory=list)
    member: Method | None = None
    seconds: float = 0.0
    failure: str = ""


def fit_member(method: Method, spots: SpotSet, test: np.ndarray | None, val: np.ndarray,
               queries: list[dict[str, Any]]) -> MemberFit:
    """Fit ``method`` on the ``spots`` outside ``test`` (None: all of them), early-stopped on the rows ``val``
    of those. With ``test`` (an inner fold), return its predictions of the ``test`` rows under each of
    ``queries`` (query-time options, no refit); else (a refit) return the fitted method. A method that cannot
    run here is a failure, not an exception. The spots are cut here, so a fold's copies live only while it
    runs."""
    train = spots if test is None else spots.subset(~test)
    start = time.perf_counter()
    try:
        method.fit(train.subset(~val), train.subset(val))
    except He2stError as exc:
        return MemberFit(seconds=time.perf_counter() - start, failure=str(exc))
    seconds = time.perf_counter() - start
    if test is None:
        return MemberFit(member=method, seconds=seconds)
    held_out, predictions = spots.subset(test), []
    unsmoothed: dict[str, np.ndarray] = {}  # smoothing averages a prediction's neighbours: made once per other option
    try:
        for options in queries:
            if "smooth_neighbours" not in options:
                method.config = method.config.model_copy(update=options)
                predictions.append(method.predict(held_out).expression)
                continue
            rest = {k: v for k, v in options.items() if k != "smooth_neighbours"}
            key = json.dumps(rest, sort_keys=True)
            if key not in unsmoothed:
                method.config = method.config.model_copy(update=rest | {"smooth_neighbours": 0})
                unsmoothed[key] = method.predict(held_out).expression
            method.config = method.config.model_copy(update=options)
            predictions.append(method.smoothed(Prediction(unsmoothed[key], []), held_out).expression)
    except He2stError as exc:
        return MemberFit(predictions, seconds=seconds, failure=str(exc))
    return MemberFit(predictions, seconds=seconds)


@register_method
class Ensemble(Method):
    """he2st's default: knn, bleep, ridge_cv, carhe and other methods within a budget, stacked by nested cross-validation.

    The members with weight are refitted on all training spots (on a pool, those whose options the selection
    cannot change alongside the inner fits)."""

    name = "ensemble"
    Config = EnsembleConfig
    chooses_views = True

    def __init__(self, config: EnsembleConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if self.context_width > 1:
            raise He2stError("ensemble: set context_neighbours/context_field/views on its members, not on the ensemble")
        for label, spec in self.config.members.items():
            if "method" not in spec:
                raise He2stError(f"ensemble member {label!r} names no method")
            method_class(spec["method"])
        if self.config.candidates != "registered":
            for candidate in self.config.candidates:
                name = candidate.get("method") if isinstance(candidate, dict) else candidate
                if name is None:
                    raise He2stError(f"ensemble candidate {candidate!r} names no method")
                if name == self.name:
                    raise He2stError("ensemble: candidates cannot name the ensemble itself")
                method_class(name)
        self.fitted: dict[str, Method] = {}
        #: how the fitted members' predictions become the ensemble's (:class:`Combination`)
        self.combination = Combination(np.zeros((0, 0), np.float32), np.zeros(0, np.float32))
        #: the inner folds' held-out groups and the combination of the members' held-out predictions, kept
        #: after a fit so that the ensemble's own out-of-fold predictions cost no further fit
        self._inner: InnerPredictions | None = None
        #: the views tried as context variants (``view_variants``; the embedded ones are known once a fit
        #: sees the training spots)
        self._views: list[str] = [] if self.config.view_variants == "embedded" else list(self.config.view_variants)

    @property
    def halo_hops(self) -> tuple[int, ...]:
        """As many hops as the deepest member, each as wide as the widest: covers every member's reads."""
        hops = [m.halo_hops for m in self._members().values()]
        depth, width = max(map(len, hops), default=0), max((k for h in hops for k in h), default=0)
        return (width,) * depth

    @property
    def reads_views(self) -> list[str]:
        """The fitted members' views; before a fit, every view a member's context candidates may choose."""
        if self.fitted:
            members = list(self.fitted.values())
        else:
            members = [self._create(label, c) for label in self.config.members for c in self._candidates(label)]
        return list(dict.fromkeys(v for m in members for v in m.reads_views))

    @property
    def uses_patches(self) -> bool:
        """A member or candidate that trains its encoder end to end (``finetune_encoder``) needs the raw
        patches loaded for the whole ensemble; the stacking on inner folds then decides its say."""
        labels = list(self.config.members) + self._candidate_labels()
        return any(self._create(label).uses_patches for label in labels)

    @property
    def predicts_whole_samples(self) -> bool:
        return self.config.scale_within == "sample"

    def _members(self) -> dict[str, Method]:
        if self.fitted:
            return self.fitted
        return {label: self._create(label) for label in self.config.members}

    def _spec(self, label: str) -> dict[str, Any]:
        """A member's spec, or a candidate's: a named candidate (labelled by its method's name) runs with that
        method's own options, a candidate given as a spec with the options it sets."""
        return self.config.members.get(label) or self._candidate_specs().get(label) or {"method": label}

    def _candidate_labels(self) -> list[str]:
        """The methods tried beside the members when the inner folds select (see :meth:`_candidate_specs`)."""
        return list(self._candidate_specs())

    def _candidate_specs(self) -> dict[str, dict[str, Any]]:
        """Label -> spec of each method tried beside the members when the inner folds select: those listed in
        ``candidates`` (a name, labelled by itself; a spec, labelled by its ``label`` key or else by its
        method and options, e.g. ``bleep(finetune_encoder=True)``), or every registered method (but the
        ensemble) whose listed cost is within ``cost_budget``. A named method some member already runs, or a
        spec some member already has, is not tried twice. A candidate that runs something no member does but
        whose label is a member's (a member labelled ``ridge`` that runs ``ridge_cv``) is still tried, as
        ``<label> (candidate)``: a label names a member's spec and its saved state, so two cannot share one."""
        members = self.config.members
        listed = self.config.candidates
        if listed == "registered":
            budget = self.config.cost_budget
            listed = [name for name in list_methods() if name != self.name
                      and (budget is None or METHODS[name].cost <= budget)]
        specs: dict[str, dict[str, Any]] = {}
        for candidate in listed:
            if isinstance(candidate, dict):
                spec = {k: v for k, v in candidate.items() if k != "label"}
                options = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "method")
                label = str(candidate.get("label") or spec["method"] + (f"({options})" if options else ""))
                taken = spec in members.values()
            else:
                label, spec = candidate, {"method": candidate}
                taken = any(member["method"] == label for member in members.values())
            if taken:
                continue
            while label in members:
                label += " (candidate)"
            specs.setdefault(label, spec)
        return specs

    def _create(self, label: str, context: dict[str, Any] | None = None) -> Method:
        spec = dict(self._spec(label)) | (context or {})
        method = create_method(spec.pop("method"), **({"seed": self.config.seed} | spec))
        method.card = self.card
        return method

    def _candidates(self, label: str) -> list[dict[str, Any]]:
        """The context options tried for a member (each a refit): its own when its spec pins them or it is a
        candidate (whose every inner fit is a cost the members' own choice does not need), else ``context``
        and one variant for each view of ``view_variants`` (the spot's features with that view appended)."""
        spec = self._spec(label)
        if label not in self.config.members or any(key in spec for key in CONTEXT_OPTIONS):
            return [{}]
        variants = [dict(c) for c in self.config.context] or [{}]
        return variants + [{"views": [v]} for v in self._views if {"views": [v]} not in variants]

    def _queries(self, label: str) -> list[dict[str, Any]]:
        """The query-time options tried on each fitted member (no refit), each unless the spec pins it:
        ``query_neighbours`` for methods that average each query with its neighbours at prediction, and
        ``smooth_neighbours`` (spatial smoothing of the member's predictions) for every method."""
        spec = self._spec(label)
        options = method_class(spec["method"]).query_options
        tried = [(key, values) for key, values in (("query_neighbours", self.config.query_neighbours),
                                                   ("smooth_neighbours", self.config.smoothing))
                 if key in options and key not in spec and values]
        return [dict(zip([k for k, _ in tried], combo, strict=True))
                for combo in itertools.product(*[v for _, v in tried])] or [{}]

    def _member_task(self, label: str, i: int, spots: SpotSet, groups: np.ndarray, test: np.ndarray | None,
                     queries: list[dict[str, Any]], val: np.ndarray | None = None) -> tuple:
        """The arguments of :func:`fit_member` for member ``label`` with context variant ``i`` fitted on the
        ``spots`` outside ``test`` (None: all), early-stopped on the rows ``val`` of those (drawn as every he2st
        fit draws them when not given)."""
        train = slice(None) if test is None else ~test
        if val is None:
            val = validation_mask(spots.sample_ids[train], self.config.validation_fraction, seed=self.config.seed,
                                  patients=groups[train])
        return self._create(label, self._candidates(label)[i]), spots, test, val, queries

    def _fit(self, train: SpotSet, val: SpotSet | None, unlabelled: SpotSet | None) -> TrainLog:
        spots = train if val is None else SpotSet.concat([train, val])
        # the refitted members stop early on the caller's validation spots, as each does when fitted on its own
        given_val = None if val is None or not len(val) else np.arange(len(spots)) >= len(train)
        groups = self.training_groups(spots)
        seconds: defaultdict[str, float] = defaultdict(float)  # each member's fits, inner and final
        held_out = held_out_groups(groups, self.config.inner_folds)
        selecting = len(held_out) >= self.config.min_selection_folds
        if self.config.view_variants == "embedded":  # chosen, like the rest of the context, only where folds select
            self._views = sorted(set(spots.views) - {FIELD}) if selecting else []
        candidates = self._candidate_labels() if selecting else []
        labels = list(self.config.members) + candidates
        defaults = {label: self._default_variant(label) for label in labels}

        def tried(label: str) -> tuple[list[int], list[int]]:
            """The member's context options and query options fitted on the inner folds: all when they
            choose, else only the member as configured."""
            if selecting:
                return list(range(len(self._candidates(label)))), list(range(len(self._queries(label))))
            return [defaults[label][0]], [defaults[label][1]]

        fits = [(label, i) for label in labels for i in tried(label)[0]]
        variants = [(lb, i, q) for lb, i in fits for q in tried(lb)[1]]
        failed: dict[tuple[str, int], str] = {}
        inner: dict[tuple[str, int, int], list[float]] = {v: [] for v in variants}
        oof = {v: np.full(spots.targets.shape, np.nan, np.float32) for v in variants}
        tests = [np.isin(groups.astype(str), fold) for fold in held_out]
        tasks = [(k, label, i) for k in range(len(held_out)) for label, i in fits]
        # here, fold after fold, so that a fit that failed is not tried on later folds; on a pool, every fold's fits
        # in one map, with each member's refit that the selection cannot change (one context variant: its spec
        # pins it, or nothing is selected), so that no worker idles while the last of them ends
        parallel = runs_in_parallel()
        batches = [tasks] if parallel else [[t for t in tasks if t[0] == k] for k in range(len(held_out))]
        early = [lb for lb in self.config.members if parallel and len(tried(lb)[0]) == 1]
        refitted: dict[str, MemberFit] = {}
        for b, batch in enumerate(batches):
            todo = [(k, label, i) for k, label, i in batch if (label, i) not in failed]
            ahead = early if b == 0 else []
            runs = map_fits(
                fit_member,
                [self._member_task(label, i, spots, groups, tests[k],
                                   [self._queries(label)[q] for q in tried(label)[1]]) for k, label, i in todo]
                + [self._member_task(label, tried(label)[0][0], spots, groups, None, [], given_val) for label in ahead],
                [self._expected_cost(label, int((~tests[k]).sum())) for k, label, _ in todo]
                + [self._expected_cost(label, len(spots)) for label in ahead])
            refitted |= dict(zip(ahead, runs[len(todo):], strict=True))
            for (k, label, i), run in zip(todo, runs[:len(todo)], strict=True):  # in fold order
                seconds[label] += run.seconds
                if (label, i) in failed:  # on a pool, a fit that failed on an earlier fold counts on no later one
                    continue
                test = tests[k]
                for q, pred in zip(tried(label)[1], run.predictions):  # those made before any failure
                    oof[(label, i, q)][test] = pred
                    inner[(label, i, q)].append(
                        mean_sample_pearson(pred, spots.targets[test], spots.sample_ids[test]))
                run.predictions = []  # copied into oof: let them go
                if run.failure:
                    failed[(label, i)] = run.failure
        # each member keeps its own configuration unless another variant is clearly better on the inner folds
        chosen: dict[str, tuple[int, int]] = {}
        dropped: dict[str, str] = {}
        for label in labels:
            ok = [(i, q) for lb, i, q in variants if lb == label and (lb, i) not in failed]
            if not ok:
                dropped[label] = "; ".join(dict.fromkeys(failed[(lb, i)] for lb, i in fits if lb == label))
                continue
            default = defaults[label]
            if default not in ok:  # the member as configured could not run: the first variant that did
                default = ok[0]
            scores = {v: inner[(label, *v)] for v in ok}
            chosen[label] = one_standard_error_choice(scores, default) if selecting else default
        if not chosen:  # nothing to stack: say why each failed rather than stacking an empty set
            raise He2stError(f"ensemble: no member could be fitted ({'; '.join(f'{k}: {v}' for k, v in dropped.items())})")
        combination = self._stack(spots, [oof[(lb, *v)] for lb, v in chosen.items()], len(held_out))
        kept = list(chosen)
        self.fitted = {}
        # a member with no say in any gene is not refitted (an early refit is let go): it would change no prediction
        weightless = [lb for lb in chosen if not (self.combination.weights[:, kept.index(lb)] > 0).any()]
        late = [lb for lb in chosen if lb not in weightless and lb not in refitted]
        refitted |= dict(zip(late, map_fits(
            fit_member, [self._member_task(label, chosen[label][0], spots, groups, None, [], given_val) for label in late],
            [self._expected_cost(label, len(spots)) for label in late]), strict=True))
        for label, run in refitted.items():
            seconds[label] += run.seconds
        refits = [lb for lb in chosen if lb not in weightless]
        for label in chosen:
            if label in weightless:
                dropped[label] = "weight 0 for every gene on the inner folds (left out of the model)"
                continue
            run = refitted[label]
            if run.failure:
                dropped[label] = run.failure
                continue
            run.member.config = run.member.config.model_copy(update=self._queries(label)[chosen[label][1]])
            self.fitted[label] = run.member
        if not self.fitted:
            raise He2stError(f"ensemble: no member could be fitted ({'; '.join(f'{k}: {v}' for k, v in dropped.items())})")
        if len(self.fitted) < len(refits):
            # a member with weight could not be refitted: the weights, scale and intercepts fitted with it would
            # leave its share out of the sum, so the combination is fitted again on the others' held-out predictions
            combination = self._stack(spots, [oof[(lb, *chosen[lb])] for lb in self.fitted], len(held_out))
        else:  # the members left out had no weight: the combination of the others is the one fitted
            self.combination = self.combination.columns([kept.index(lb) for lb in self.fitted])
        self._inner = None
        if held_out:
            members = np.stack([oof[(lb, *chosen[lb])] for lb in self.fitted], axis=-1)
            self._inner = InnerPredictions([[str(g) for g in fold] for fold in held_out], spots.sample_ids,
                                           spots.barcodes, self._cross_fitted(members, spots, groups, held_out,
                                                                              combination))
        log = TrainLog()
        log.selection = {
            "inner_folds": ["+".join(fold) for fold in held_out],
            "candidates": candidates,
            "inner_pearson": {lb: inner[(lb, *chosen[lb])] for lb in chosen},
            "context": {lb: self._variant(lb, *chosen[lb]) for lb in chosen},
            "context_inner_pearson": {
                lb: {json.dumps(self._variant(lb, i, q), sort_keys=True): [round(float(r), 4) for r in inner[(lb, i, q)]]
                     for lb_, i, q in variants if lb_ == lb and inner[(lb, i, q)]}
                for lb in chosen},
            "combination": combination,
            "scale_within": "inner" if self.combination.deviations is None else "sample",
            "weights": {lb: self.combination.weights[:, i].round(4).tolist() for i, lb in enumerate(self.fitted)},
            "dropped": dropped,
            "member_seconds": {lb: round(t, 1) for lb, t in seconds.items()},
        }
        return log

    def _expected_cost(self, label: str, n_spots: int) -> float:
        """A fit's expected duration, to order a pool's tasks: its method's listed cost per 1,000 spots (the
        registry's) times the spots it trains on."""
        return METHODS[self._spec(label)["method"]].cost * n_spots

    def _default_variant(self, label: str) -> tuple[int, int]:
        """The tried variant that is the member as configured (its own defaults); the first if none is."""
        config = self._create(label).config

        def first_match(options: list[dict[str, Any]]) -> int:
            return next((i for i, o in enumerate(options) if all(getattr(config, k) == v for k, v in o.items())), 0)

        return first_match(self._candidates(label)), first_match(self._queries(label))

    def _variant(self, label: str, i: int, q: int) -> dict[str, Any]:
        """The options of one tried variant of a member (context features and query-time context)."""
        return self._candidates(label)[i] | self._queries(label)[q]

    def _stack(self, spots: SpotSet, predictions: list[np.ndarray], n_folds: int) -> Mode:
        """The members' combination fitted on their held-out predictions (:mod:`he2st.methods.stacking`; equal
        without inner folds); returns how the weights were set (``weights``; 'auto': 'global' given
        ``min_selection_folds`` inner folds, else 'equal')."""
        if not n_folds:
            self.combination = Combination.equal(len(predictions), spots.targets.shape[1])
            return "equal"
        mode = self.config.weights
        if mode == "auto":
            mode = "global" if n_folds >= self.config.min_selection_folds else "equal"
        self.combination = fit_combination(np.stack(predictions, axis=-1), spots.targets, spots.sample_ids, mode,
                                           self.predicts_whole_samples)
        return mode

    def _cross_fitted(self, members: np.ndarray, spots: SpotSet, groups: np.ndarray, held_out: list[np.ndarray],
                      mode: Mode) -> np.ndarray:
        """The members' held-out predictions (spots, genes, members) combined fold by fold, each by a combination
        fitted (under ``mode``) on the other folds only, so that the weights and scale that combine the ensemble's
        own out-of-fold predictions -- what its reliability estimate is made of -- are not fitted on the measured
        values they are scored against. The link left is indirect: the other folds' predictions come from member
        models that trained on this fold (removing it would take a fit per pair of folds). Each member's variant,
        chosen on all folds, is kept as chosen."""
        combined = np.empty(members.shape[:2], np.float32)
        labels = groups.astype(str)
        for fold in held_out:
            test = np.isin(labels, fold)
            fitted = fit_combination(members[~test], spots.targets[~test], spots.sample_ids[~test], mode,
                                     self.predicts_whole_samples)
            combined[test] = fitted(members[test], spots.sample_ids[test])
        return combined

    def _predict(self, spots: SpotSet) -> Prediction:
        preds = np.stack([m.predict(spots).expression for m in self.fitted.values()], axis=-1)  # (n, G, M)
        return Prediction(self.combination(preds, spots.sample_ids), list(self.panel.genes))

    def out_of_fold(self, spots: SpotSet, groups: np.ndarray, folds: list[np.ndarray],
                    validation_fraction: float = 0.15, beyond: np.ndarray | None = None,
                    beyond_genes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The members' inner-fold predictions, each fold combined by weights fitted on the other folds and then
        smoothed as the ensemble's predictions are (``smooth_neighbours``), when ``spots`` are the rows its fit
        saw and ``folds`` the ones it held out; else refits. (Which members take part, and their variants, were
        chosen on all the folds, which makes this a little optimistic.)"""
        if self._inner is not None and self._inner.matches(spots, folds):
            inner = Prediction(self._inner.predictions, list(self.panel.genes))
            return self.smoothed(inner, spots).expression, None  # the ensemble returns its panel only
        return super().out_of_fold(spots, groups, folds, validation_fraction)

    # ------------------------------------------------------------------ persistence
    def layout(self) -> dict[str, Any]:
        return {"members": {lb: {"config": m.config.model_dump(mode="json"), "layout": m.layout()}
                            | ({"bank_samples": _sample_codes(m.bank.sample_ids)[0]}
                               if m.bank is not None and m.bank.sample_ids is not None else {})
                            for lb, m in self.fitted.items()}}

    def state(self) -> dict[str, torch.Tensor]:
        c = self.combination
        state = {"weights": torch.from_numpy(c.weights), "intercepts": torch.from_numpy(c.intercepts)}
        if c.deviations is not None:
            state["deviations"] = torch.from_numpy(c.deviations)
        if c.level_shares is not None:
            state["level_shares"] = torch.from_numpy(c.level_shares)
        for label, member in self.fitted.items():
            state |= {f"{label}.{k}": v for k, v in member.state().items()}
            if member.bank is not None:
                state |= {f"{label}.bank.{k}": torch.from_numpy(np.ascontiguousarray(v))
                          for k, v in (("embeddings", member.bank.embeddings), ("expression", member.bank.expression))}
                if member.bank.sample_ids is not None:  # per-sample retrieval needs each row's sample
                    state[f"{label}.bank.sample_index"] = torch.tensor(_sample_codes(member.bank.sample_ids)[1])
        return state

    def load_state(self, state: dict[str, torch.Tensor], layout: dict[str, Any]) -> None:
        self.combination = Combination(state["weights"].numpy(), state["intercepts"].numpy(),
                                       state["deviations"].numpy() if "deviations" in state else None,
                                       state["level_shares"].numpy() if "level_shares" in state else None)
        self.fitted = {}
        for label, saved in layout["members"].items():
            method = self._create(label)
            method.config = type(method.config).model_validate(saved["config"])
            own = strip_prefix(state, label)
            method.load_state({k: v for k, v in own.items() if not k.startswith("bank.")}, saved["layout"])
            if "bank.embeddings" in own:
                samples = saved.get("bank_samples")
                sample_ids = None if samples is None else [samples[i] for i in own["bank.sample_index"].tolist()]
                method.bank = ReferenceBank(own["bank.embeddings"].numpy(), own["bank.expression"].numpy(),
                                            self.panel.genes, sample_ids, normalize=False)
            self.fitted[label] = method
