"""``he2st survival``: outcome models from a table of slide predictions.

The table (CSV) has one row per slide: ``prediction`` (a prediction ``.h5ad``; relative paths are
relative to the table), ``time`` (follow-up, any unit, > 0) and ``event`` (1 = recurrence/death, 0 =
censored); an optional ``slide`` column names the rows, and an optional ``patient`` column says which rows
belong to one patient (several slides of a patient share its time and event; they are kept in one fold and
resampled together). Features and models: :mod:`he2st.evaluate.survival`.
Outputs, each written atomically into ``out``: ``results.json`` (scores, intervals, Cox coefficients,
settings) and ``risk.csv`` (out-of-fold risks and groups per slide); the command adds ``km.png``
(Kaplan-Meier curves of the risk groups, :mod:`he2st.report.survival_plot`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from he2st.errors import He2stError
from he2st.evaluate.survival import (
    FoldFeatures,
    SurvivalCv,
    cross_validate,
    patient_index,
    risk_groups,
    signature_score,
    tls_density,
)
from he2st.evaluate.tls import TlsModel, gene_symbols, tls_score
from he2st.io import (
    check_finite,
    check_folder,
    check_output,
    input_path,
    read_h5ad_checked,
    table_path,
    write_json_atomic,
    write_text_atomic,
)
from he2st.workflows.tls import read_model


@dataclass
class Cohort:
    slides: list[str]
    paths: list[Path]
    time: np.ndarray
    event: np.ndarray
    patients: np.ndarray  # the patient of each row (str); each row its own when the table names none


@dataclass
class SurvivalResult:
    cohort: Cohort
    features: pd.DataFrame
    cv: SurvivalCv
    high_risk: np.ndarray
    logrank_p: float
    tls_threshold: float | None
    paths: dict[str, Path]


def read_cohort(table: Path) -> Cohort:
    """The slide table, checked: columns, numbers, 0/1 events, files that exist."""
    table_path(table, "slide table")
    try:
        frame = pd.read_csv(table)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise He2stError(f"cannot read the slide table ({exc})", table) from exc
    missing = {"prediction", "time", "event"} - set(frame.columns)
    if missing:
        raise He2stError(f"the slide table lacks column(s) {', '.join(sorted(missing))} "
                         "(needs prediction, time, event)", table)
    time = pd.to_numeric(frame["time"], errors="coerce").to_numpy(np.float64)
    event = pd.to_numeric(frame["event"], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(time).all() or (time <= 0).any():
        raise He2stError(f"row {int(np.argmax(~np.isfinite(time) | (time <= 0))) + 2}: time must be a positive "
                         "number", table)
    if not np.isin(event, (0, 1)).all():
        raise He2stError(f"row {int(np.argmax(~np.isin(event, (0, 1)))) + 2}: event must be 0 or 1", table)
    paths = [Path(p) if Path(p).is_absolute() else table.parent / p for p in frame["prediction"].astype(str)]
    for row, path in enumerate(paths):
        try:
            input_path(path, "prediction file")
        except He2stError as exc:
            raise He2stError(f"row {row + 2}: {exc}", table) from None
    slides = frame["slide"].astype(str).tolist() if "slide" in frame else [p.stem for p in paths]
    return Cohort(slides, paths, time, event.astype(np.int64), _patients(frame, time, event, table))


def _patients(frame: pd.DataFrame, time: np.ndarray, event: np.ndarray, table: Path) -> np.ndarray:
    """The ``patient`` column (each row its own patient without one), checked: one outcome per patient."""
    if "patient" not in frame:
        return np.array([f"row{k + 2}" for k in range(len(frame))])
    raw = frame["patient"]
    if raw.isna().any():
        raise He2stError(f"row {int(np.argmax(raw.isna().to_numpy())) + 2}: patient is empty", table)
    patients = raw.astype(str).str.strip().to_numpy()
    seen: dict[str, int] = {}
    for row, patient in enumerate(patients):
        first = seen.setdefault(patient, row)
        if time[row] != time[first] or event[row] != event[first]:
            raise He2stError(f"row {row + 2}: patient {patient} has another time or event than on row {first + 2} "
                             "(an outcome belongs to the patient)", table)
    return patients


def _dense(adata: ad.AnnData) -> np.ndarray:
    return np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float64)


def shared_genes(paths: list[Path]) -> pd.Index:
    """Gene symbols (upper case) predicted exactly once in every one of ``paths`` (var names only are read)."""
    shared = None
    for path in paths:
        adata = read_h5ad_checked(path, "prediction file", backed=True)
        names = gene_symbols(adata.var_names)
        adata.file.close()
        names = names[~names.duplicated(keep=False)]
        shared = names if shared is None else shared.intersection(names)
    return shared if shared is not None else pd.Index([])


def on_shared_genes(model: TlsModel, shared: pd.Index, what: str) -> TlsModel:
    """``model`` on the genes every slide holds: a slide scored on fewer genes would have a feature that
    says which genes its prediction holds, not how much of the signature it expresses."""
    restricted = model.restricted(shared)
    if len(restricted.weights) == 0:
        raise He2stError(f"no gene of the {what} is predicted in every slide of the table")
    return restricted


def slide_features(paths: list[Path], signature: TlsModel | None = None, genes: list[str] | None = None,
                   tls: TlsModel | None = None) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """One row per slide: ``signature`` (mean spot score), ``tls_mean``, ``mean:<gene>``; and each slide's spot
    TLS scores (empty without ``tls``), from which ``tls_density`` is made fold by fold (:func:`density_of`).

    The signature and the TLS model are scored on their genes that every slide holds (:func:`on_shared_genes`),
    so that every slide's feature is the same sum."""
    if signature is not None or tls is not None:
        shared = shared_genes(paths)
        signature = on_shared_genes(signature, shared, "signature") if signature is not None else None
        tls = on_shared_genes(tls, shared, "TLS model") if tls is not None else None
    rows, tls_scores = [], []
    for path in paths:
        adata = read_h5ad_checked(path, "prediction file")
        values, names = _dense(adata), list(adata.var_names)
        check_finite(values, "its expression matrix (X)", path)
        row = {}
        try:
            if signature is not None:
                row["signature"] = float(signature_score(values, names, signature).mean())
            for gene in genes or []:
                if gene not in adata.var_names:
                    raise He2stError(f"gene {gene} is not in the predictions")
                row[f"mean:{gene}"] = float(values[:, names.index(gene)].mean())
            if tls is not None:
                scale = str(dict(adata.uns.get("he2st", {})).get("target_transform", "log1p_cp10k"))
                tls_scores.append(tls_score(values, names, tls, scale).score)
                row["tls_mean"] = float(tls_scores[-1].mean())
        except He2stError as exc:
            raise He2stError(exc.problem, path) from exc
        rows.append(row)
    return pd.DataFrame(rows), tls_scores


def density_of(scores: list[np.ndarray], threshold: float | None) -> FoldFeatures:
    """``tls_density`` of every slide at ``threshold``, else at the 0.9 quantile of the spot scores of the
    slides it is given (a fold's training slides), with the threshold it used."""

    def features(rows: np.ndarray) -> tuple[pd.DataFrame, float]:
        density, cut = tls_density(scores, threshold, rows=rows)
        return pd.DataFrame({"tls_density": density}), cut

    return features


def run_survival(table: Path, out: Path, horizon: float, signature: Path | None = None,
                 genes: list[str] | None = None, tls: str | None = None, tls_threshold: float | None = None,
                 folds: int = 5, penalizer: float = 0.1, draws: int = 500, seed: int = 0) -> SurvivalResult:
    """Features, cross-validated models and their scores; writes results.json and risk.csv (the caller draws
    km.png from the result: drawing lives a floor up)."""
    cohort = read_cohort(table)
    if not horizon > 0:
        raise He2stError(f"--horizon must be a positive time, got {horizon}")
    if tls_threshold is not None and not math.isfinite(tls_threshold):
        raise He2stError(f"--tls-threshold must be a finite number, got {tls_threshold}")
    check_folder(out)  # before any work: outputs he2st did not write are refused
    for name in ("results.json", "risk.csv", "km.png"):
        check_output(out / name)
    try:
        features, tls_scores = slide_features(cohort.paths, TlsModel.read(signature) if signature else None, genes,
                                              read_model(tls) if tls else None)
    except He2stError as exc:  # a problem of the whole table (no shared gene) names the table
        raise He2stError(exc.problem, exc.path or table) from exc
    features.index = pd.Index(cohort.slides, name="slide")
    by_fold = density_of(tls_scores, tls_threshold) if tls else None
    cv = cross_validate(features, cohort.time, cohort.event, horizon, folds, penalizer, draws, seed,
                        groups=cohort.patients, fold_features=by_fold)
    threshold = by_fold(np.arange(len(tls_scores)))[1] if by_fold else None  # the refit's: all slides
    features = pd.concat([features, cv.fold_values.set_axis(features.index)], axis=1)
    high, p_value = risk_groups(cohort.time, cohort.event, cv.cox_risk, cohort.patients)
    risk = features.assign(patient=cohort.patients, time=cohort.time, event=cohort.event, fold=cv.fold, cox_risk=cv.cox_risk,
                           dfs_probability=cv.dfs_probability, risk_group=np.where(high, "high", "low"))
    write_text_atomic(out / "risk.csv", risk.to_csv())
    first = patient_index(cohort.patients)[0]
    results = {"n_slides": len(cohort.slides), "n_patients": len(first), "n_events": int(cohort.event[first].sum()),
               "horizon": horizon,
               "folds": folds, "penalizer": penalizer, "bootstrap_draws": draws, "seed": seed,
               "features": list(features.columns), "tls_threshold": threshold,
               "tls_threshold_per_fold": cv.fold_settings if tls else None, "logrank_p": p_value,
               "cox_coefficients": {k: float(v) for k, v in cv.coefficients.items()}, **cv.scores}
    write_json_atomic(out / "results.json", results)
    return SurvivalResult(cohort, features, cv, high, p_value, threshold,
                          {"results": out / "results.json", "risk": out / "risk.csv", "km": out / "km.png"})
