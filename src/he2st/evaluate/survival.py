"""Outcome from predicted expression: slide-level features, a Cox model, a DFS classifier, and their scores.

A prediction covers one slide with many spots; an outcome belongs to the patient. Features are slide
summaries of predicted expression -- weighted signature scores (spot score = weighted sum of the
signature's genes, slide feature = its mean over spots), the TLS density (share of spots whose TLS
score reaches a threshold: given, else set on the spot scores of each fold's training slides), chosen
genes' means.

Models: a penalised Cox model (lifelines) for the hazard, and a logistic regression (scikit-learn) for
"event before the horizon". Both are scored on out-of-fold predictions of a stratified k-fold split,
features standardised with the training folds' mean and deviation only. A patient with several slides
(serial sections, several blocks) shares one outcome among them, so the split keeps a patient's slides in
one fold (stratified group k-fold) and the bootstrap resamples patients: a slide of a test patient in the
training folds would let the model recognise the patient rather than learn the outcome. Scores:

* Harrell's C-index of the Cox risk;
* the cumulative/dynamic AUC at the horizon (as scikit-survival's ``cumulative_dynamic_auc``): cases
  are slides with an event by the horizon, weighted by the inverse probability of being still
  uncensored then (Kaplan-Meier of the censoring times, IPCW); controls are slides still event-free
  after it. Slides censored before the horizon are neither, and the weights stand in for them;
* 95% bootstrap intervals (patients resampled with all their slides, out-of-fold risks kept).
The classifier is trained only on slides whose status at the horizon is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from he2st.errors import He2stError
from he2st.evaluate.tls import TlsModel, model_columns


def _lifelines():
    try:
        import lifelines
    except ImportError as exc:
        raise He2stError("survival models need lifelines: pip install 'he2st[survival]'") from exc
    return lifelines


# ------------------------------------------------------------------ features
def signature_score(values: np.ndarray, genes: list[str], signature: TlsModel) -> np.ndarray:
    """Per-spot weighted sum of the signature's genes (prediction scale; genes matched as TLS models match
    them, :func:`~he2st.evaluate.tls.model_columns`: upper case, a gene predicted twice left out)."""
    present, columns = model_columns(list(genes), signature, "signature")
    return np.asarray(values, dtype=np.float64)[:, columns] @ signature.weights[present].to_numpy()


def tls_density(scores: list[np.ndarray], threshold: float | None = None, quantile: float = 0.9,
                rows: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Share of each slide's spots at or above one threshold: ``threshold``, else the ``quantile`` of the
    scores of the slides ``rows`` (all when None) pooled -- in cross-validation the fold's training slides, so
    that no threshold is set on a slide it then scores."""
    chosen = range(len(scores)) if rows is None else rows
    cut = float(np.quantile(np.concatenate([scores[i] for i in chosen]), quantile)) if threshold is None else float(
        threshold)
    return np.array([float((s >= cut).mean()) for s in scores]), cut


#: columns of the slides' features computed from a fold's training slides alone (``rows``): their values for
#: every slide, and what was set on those slides (e.g. a threshold)
FoldFeatures = Callable[[np.ndarray], tuple[pd.DataFrame, float]]


# ------------------------------------------------------------------ metrics
def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index: the share of comparable pairs whose higher risk fails first (risk ties count half).

    A pair is comparable when the earlier time is an event (a censoring at the same time counts as
    later), as in lifelines' ``concordance_index``; all pairs at once, so bootstraps stay cheap."""
    time, event, risk = (np.asarray(a, dtype=np.float64) for a in (time, event, risk))
    ti, tj = time[:, None], time[None, :]
    comparable = (event[:, None] == 1) & ((ti < tj) | ((ti == tj) & (event[None, :] == 0)))
    if not comparable.any():
        return float("nan")
    ri, rj = risk[:, None], risk[None, :]
    wins = np.where(ri > rj, 1.0, np.where(ri == rj, 0.5, 0.0))
    return float(wins[comparable].sum() / comparable.sum())


def _censoring_survival(time: np.ndarray, event: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Kaplan-Meier probability of staying uncensored just before each of ``at`` (censoring = the event)."""
    order = np.unique(time[event == 0])
    at_risk = np.array([(time >= t).sum() for t in order])
    censored = np.array([((time == t) & (event == 0)).sum() for t in order])
    surv = np.concatenate([[1.0], np.cumprod(1 - censored / at_risk)])
    return surv[np.searchsorted(order, at, side="left")]  # steps strictly before ``at``


def cumulative_dynamic_auc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float) -> float:
    """IPCW cumulative/dynamic AUC at ``horizon`` (see the module docstring); NaN without cases or controls."""
    time, event, risk = (np.asarray(a, dtype=np.float64) for a in (time, event, risk))
    cases = (time <= horizon) & (event == 1)
    controls = time > horizon
    if not cases.any() or not controls.any():
        return float("nan")
    g = _censoring_survival(time, event, time[cases])
    weights = 1.0 / np.clip(g, 1e-8, None)
    rc, rk = risk[cases][:, None], risk[controls][None, :]
    wins = (rc > rk).sum(axis=1) + 0.5 * (rc == rk).sum(axis=1)
    return float((weights * wins).sum() / (weights.sum() * controls.sum()))


def patient_index(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's first row and each row's patient number (patients in sorted order)."""
    _, first, inverse = np.unique(np.asarray(groups).astype(str), return_index=True, return_inverse=True)
    return first, inverse.ravel()


def bootstrap_interval(stat, n: int, draws: int = 500, seed: int = 0, level: float = 0.95,
                       groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile interval of ``stat(rows)`` over ``draws`` resamples of ``n`` rows (NaN draws skipped).

    With ``groups`` (a patient per row) whole patients are resampled, each with all its rows: the rows of one
    patient are not independent, and resampling them one by one would make the interval too narrow."""
    rng = np.random.default_rng(seed)
    if groups is None:
        values = np.array([stat(rng.integers(0, n, n)) for _ in range(draws)])
    else:
        _, inverse = patient_index(groups)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        values = np.array([stat(np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]))
                           for _ in range(draws)])
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    return tuple(float(v) for v in np.quantile(values, [(1 - level) / 2, (1 + level) / 2]))


# ------------------------------------------------------------------ models
@dataclass
class SurvivalCv:
    """Out-of-fold risks and their scores."""

    cox_risk: np.ndarray  # log partial hazard per slide
    dfs_probability: np.ndarray  # P(event by the horizon); NaN never (every slide is predicted)
    fold: np.ndarray
    scores: dict[str, float | list[float]]
    coefficients: pd.Series  # the Cox model refitted on all slides (standardised features)
    #: the columns of ``fold_features``: each slide's values from the fold that held it out
    fold_values: pd.DataFrame = field(default_factory=pd.DataFrame)
    fold_settings: list[float] = field(default_factory=list)  # what each fold set on its training slides


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    return (train - mean) / std, (test - mean) / std


def _cox(features: pd.DataFrame, time: np.ndarray, event: np.ndarray, penalizer: float) -> pd.Series:
    """The fitted Cox coefficients, one per feature; a feature constant on these slides gets 0.

    A constant column tells the hazard nothing, and lifelines, which divides each column by its deviation,
    stops on it with a convergence error; e.g. TLS density at a threshold few slides reach can be 0 on every
    training slide of a fold."""
    lifelines = _lifelines()
    varies = features.columns[features.std(axis=0, ddof=0).to_numpy() > 0]
    coef = pd.Series(0.0, index=features.columns, name="coef")
    if len(varies) == 0:
        return coef
    table = features[varies].assign(_time=time, _event=event)
    try:
        model = lifelines.CoxPHFitter(penalizer=penalizer).fit(table, duration_col="_time", event_col="_event")
    except Exception as exc:  # lifelines raises convergence errors of several types
        raise He2stError(f"the Cox model did not converge ({type(exc).__name__}: {exc}); fewer features or a "
                         "larger penalizer may help") from exc
    coef[varies] = model.params_[varies].to_numpy()
    return coef


def cross_validate(features: pd.DataFrame, time: np.ndarray, event: np.ndarray, horizon: float, folds: int = 5,
                   penalizer: float = 0.1, draws: int = 500, seed: int = 0,
                   groups: np.ndarray | None = None, fold_features: FoldFeatures | None = None) -> SurvivalCv:
    """Out-of-fold Cox risks and DFS probabilities, C-index and AUC at ``horizon`` with bootstrap intervals.

    ``groups`` names each slide's patient (default: every slide its own patient); a patient's slides share
    one fold and are resampled together (module docstring). ``fold_features`` adds columns computed from each
    fold's training slides (and, for the refit, from all): ``SurvivalCv.fold_values`` holds each slide's values
    from the fold that held it out, ``fold_settings`` what each fold set."""
    time, event = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=np.int64)
    n = len(time)
    every = None if fold_features is None else fold_features(np.arange(n))[0].set_axis(features.index)
    if every is not None:
        features = pd.concat([features, every], axis=1)  # the checks see every column
    if features.shape[1] == 0:
        raise He2stError("no features: give a signature, genes or a TLS model")
    if not (features.std(axis=0, ddof=0).to_numpy() > 0).any():
        raise He2stError(f"no feature varies across the slides ({', '.join(map(str, features.columns))}): "
                         "nothing to rank them by; give other features or a lower --tls-threshold")
    grouped = groups is not None and len(np.unique(np.asarray(groups).astype(str))) < n
    first = patient_index(groups)[0] if grouped else np.arange(n)
    events, patients = int(event[first].sum()), len(first)
    if events < folds or (patients - events) < folds:
        raise He2stError(f"too few events ({events} of {patients} patients) for {folds}-fold cross-validation")
    own = features.drop(columns=[] if every is None else every.columns)
    x = features.to_numpy(np.float64)  # fold columns (the last) replaced fold by fold below
    cox_risk, probability, fold_of = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
    fold_values, fold_settings = features.drop(columns=own.columns).copy(), []
    if grouped:
        split = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(
            x, event, np.asarray(groups).astype(str))
    else:
        split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, event)
    for k, (train, test) in enumerate(split):
        if fold_features is not None:
            values, setting = fold_features(train)
            x = np.concatenate([own.to_numpy(np.float64), values.to_numpy(np.float64)], axis=1)
            fold_values.iloc[test] = values.iloc[test].to_numpy()
            fold_settings.append(setting)
        xtr, xte = _standardise(x[train], x[test])
        coef = _cox(pd.DataFrame(xtr, columns=features.columns), time[train], event[train], penalizer)
        cox_risk[test] = xte @ coef.to_numpy()  # the log partial hazard (lifelines centres it; ranks agree)
        known = (time[train] > horizon) | (event[train] == 1)  # status at the horizon is known
        label = (time[train] <= horizon) & (event[train] == 1)
        if len(np.unique(label[known])) < 2:
            raise He2stError(f"fold {k + 1}: every slide with a known status at horizon {horizon:g} is in one class; "
                             "choose another horizon")
        clf = LogisticRegression(C=1.0, max_iter=1000).fit(xtr[known], label[known])
        probability[test] = clf.predict_proba(xte)[:, 1]
        fold_of[test] = k

    def scored(risk: np.ndarray) -> dict[str, float | list[float]]:
        c = concordance(time, event, risk)
        auc = cumulative_dynamic_auc(time, event, risk, horizon)
        by = groups if grouped else None
        return {"c_index": c, "c_index_ci": list(bootstrap_interval(
                    lambda r: concordance(time[r], event[r], risk[r]), n, draws, seed, groups=by)),
                "auc": auc, "auc_ci": list(bootstrap_interval(
                    lambda r: cumulative_dynamic_auc(time[r], event[r], risk[r], horizon), n, draws, seed,
                    groups=by))}

    scores = {f"cox_{k}": v for k, v in scored(cox_risk).items()}
    scores |= {f"dfs_{k}": v for k, v in scored(probability).items()}
    x = features.to_numpy(np.float64)  # the refit on all slides: fold columns set on all of them
    full, _ = _standardise(x, x)
    refit = _cox(pd.DataFrame(full, columns=features.columns), time, event, penalizer)
    return SurvivalCv(cox_risk, probability, fold_of, scores, refit, fold_values, fold_settings)


def risk_groups(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                groups: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """High-risk membership per slide and the log-rank p-value between the groups.

    Decided per patient (``groups``; default every slide its own): a patient's risk is the mean out-of-fold
    risk of its slides, high when above the median patient's, and the log-rank test counts each patient once
    -- counting a patient's slides as several subjects would shrink the p-value."""
    _lifelines()
    from lifelines.statistics import logrank_test

    time, event, risk = np.asarray(time), np.asarray(event), np.asarray(risk, dtype=np.float64)
    first, inverse = patient_index(groups if groups is not None else np.arange(len(time)))
    patient_risk = np.bincount(inverse, risk) / np.bincount(inverse)
    high = patient_risk > np.median(patient_risk)
    t, e = time[first], event[first]
    test = logrank_test(t[high], t[~high], e[high], e[~high])
    return high[inverse], float(test.p_value)
