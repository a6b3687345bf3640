"""Turn per-sample scores into fold scores and cross-fold summaries (rendering: ``tables``; files: ``results``).

Aggregation follows HEST/BLEEP: within a held-out sample, each gene's Pearson correlation
is taken across that sample's spots and averaged over a gene set; a fold's score for the
set is the mean of those per-sample set means over the fold's test samples (each sample
counts once, however many spots it has). The summary reports mean and sd of fold scores.
Scores pooled over all of a fold's test spots are kept alongside, since some papers report
those instead, but they are not the headline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from he2st.errors import He2stError
from he2st.evaluate.metrics import SET_METRICS, evaluate_sample
from he2st.evaluate.reliability import RELIABILITY_METRICS

LOCALISATION = "localisation_"  # metric prefix of cancer localisation rows in the summary

__all__ = ["FoldResult", "Level", "average_results", "evaluate_fold", "summarise", "summarise_extra"]

Level = Literal["per_sample", "pooled"]


@dataclass
class FoldResult:
    """The scores of one method on one cross-validation fold.

    ``per_sample`` maps test sample -> gene set -> metric (keys of ``SET_METRICS``);
    ``pooled`` maps gene set -> metric computed once on all the fold's test spots stacked;
    ``per_gene`` has one row per (sample, gene) with pearson, spearman, mse, mae;
    ``extra`` holds fold-level scores beyond the panel (whole transcriptome, cell-type proportions);
    ``localisation`` maps signature -> metric -> fold value of cancer localisation
    (:mod:`~he2st.evaluate.localisation`), empty when no test sample carries region labels; ``notes`` says
    in words how the fold's choices were made and what was left out;
    ``curves`` the training curves of each run behind it (seed label -> curve name -> values per epoch).
    """

    method: str
    fold: int | str
    test_samples: list[str]
    per_sample: dict[str, dict[str, dict[str, float]]]
    pooled: dict[str, dict[str, float]]
    per_gene: pd.DataFrame
    extra: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)  # seed label -> choices on training data
    localisation: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def set_scores(self, level: Level = "per_sample") -> dict[str, dict[str, float]]:
        """Fold score per gene set and metric.

        ``per_sample`` (the headline): mean over test samples of each sample's set value;
        a NaN in one sample makes the fold value NaN rather than being skipped quietly.
        ``pooled``: the values computed on the stacked test spots.
        """
        if level == "pooled":
            return self.pooled
        if not self.test_samples:
            raise He2stError(f"{self.method} fold {self.fold}: no test samples were scored")
        samples = [self.per_sample[s] for s in self.test_samples]
        set_names = list(samples[0])
        if any(list(s) != set_names for s in samples[1:]):
            raise He2stError(f"{self.method} fold {self.fold}: test samples were scored on different gene sets")
        return {
            name: {m: float(np.mean([s[name][m] for s in samples])) for m in samples[0][name]}
            for name in set_names
        }


def evaluate_fold(
    method: str,
    fold: int | str,
    preds: Mapping[str, np.ndarray],
    trues: Mapping[str, np.ndarray],
    genes: Sequence[str],
    gene_sets: Mapping[str, Sequence[str]],
    per_sample_sets: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> FoldResult:
    """Score every test sample of a fold and the fold's stacked test spots.

    ``preds``/``trues`` map test sample -> (spots x genes) matrix. ``per_sample_sets`` adds
    sets that differ per sample (such as ``test_sample_gene_sets``); they are scored per
    sample only, because a set chosen on one sample has no meaning for the stacked spots.
    """
    if set(preds) != set(trues):
        raise He2stError(
            f"{method} fold {fold}: predictions cover samples {sorted(preds)} but truth covers {sorted(trues)}"
        )
    if not trues:
        raise He2stError(f"{method} fold {fold}: no test samples to score")
    samples = list(trues)
    per_sample: dict[str, dict[str, dict[str, float]]] = {}
    tables = []
    for sample in samples:
        sets = dict(gene_sets)
        if per_sample_sets is not None:
            sets.update(per_sample_sets.get(sample, {}))
        scores = evaluate_sample(preds[sample], trues[sample], genes, sets)
        per_sample[sample] = scores.per_set
        tables.append(scores.per_gene.assign(sample=sample))
    pooled = evaluate_sample(
        np.vstack([preds[s] for s in samples]), np.vstack([trues[s] for s in samples]), genes, gene_sets
    ).per_set
    per_gene = pd.concat(tables, ignore_index=True)
    per_gene = per_gene[["sample", *[c for c in per_gene.columns if c != "sample"]]]
    return FoldResult(method, fold, samples, per_sample, pooled, per_gene)


def average_results(results: Sequence[FoldResult]) -> FoldResult:
    """Mean of several runs of one method on one fold (e.g. training seeds): every score averaged.

    Seeds are averaged at the level of scores, not predictions, so the result describes a single
    model's expected performance rather than an ensemble's.
    """
    if len(results) == 1:
        return results[0]
    first = results[0]

    def mean_of(dicts: list[dict]) -> dict:
        return {k: (mean_of([d[k] for d in dicts]) if isinstance(dicts[0][k], dict)
                    else float(np.mean([d[k] for d in dicts]))) for k in dicts[0]}

    per_sample = mean_of([r.per_sample for r in results])
    pooled = mean_of([r.pooled for r in results])
    per_gene = _mean_per_gene([r.per_gene for r in results])
    extra = {k: float(np.mean([r.extra[k] for r in results])) for k in first.extra}
    curves = {label: c for r in results for label, c in r.curves.items()}
    selection = {label: c for r in results for label, c in r.selection.items()}
    return FoldResult(first.method, first.fold, list(first.test_samples), per_sample, pooled, per_gene, extra, curves,
                      selection, mean_of([r.localisation for r in results]), dict(first.notes))


def _mean_per_gene(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Mean of the runs' per-gene scores, row by (sample, gene); NaN in any run stays NaN.

    pandas' groupby mean skips NaN, which would give a gene the r of the seeds that did not predict it as a
    constant: per_gene.csv would then hide the constant and disagree with the set means (``n_nan``), which
    are averaged over seeds with the NaN kept.
    """
    keys = ["sample", "gene"]
    first = tables[0]
    for table in tables[1:]:
        if not table[keys].reset_index(drop=True).equals(first[keys].reset_index(drop=True)):
            raise He2stError("the runs to average scored different (sample, gene) rows")
    columns = [c for c in first.columns if c not in keys and pd.api.types.is_numeric_dtype(first[c])]
    stacked = np.stack([t[columns].to_numpy(dtype=np.float64) for t in tables])
    return pd.concat([first[keys].reset_index(drop=True), pd.DataFrame(stacked.mean(axis=0), columns=columns)],
                     axis=1)


def _fold_column(fold: int | str) -> str:
    return f"fold_{fold}"


def _row(keys: dict[str, Any], values: dict[int | str, float], fold_ids: list) -> dict[str, Any]:
    """``keys`` and the mean, sd (ddof=1; NaN with one fold), n_folds and fold columns of fold ``values``."""
    v = np.array(list(values.values()), dtype=np.float64)
    return keys | {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                   "n_folds": int(v.size)} | {_fold_column(f): values.get(f, float("nan")) for f in fold_ids}


def summarise(fold_results: Iterable[FoldResult], level: Level = "per_sample") -> pd.DataFrame:
    """One row per (method, gene_set, metric): mean and sd of the fold scores, n_folds, and
    one ``fold_<id>`` column per fold.

    sd uses ddof=1 (folds are a sample of possible splits) and is NaN with a single fold;
    a NaN fold score propagates to the mean so a failed fold cannot disappear from view.
    At the ``per_sample`` level, cancer localisation adds rows whose gene set is the signature and whose
    metrics start with ``localisation_``, over the folds that had labelled test samples.
    """
    results = list(fold_results)
    if not results:
        raise He2stError("no fold results to summarise")
    seen: set[tuple[str, int | str]] = set()
    for r in results:
        if (r.method, r.fold) in seen:
            raise He2stError(f"fold {r.fold} of method {r.method!r} appears more than once")
        seen.add((r.method, r.fold))
    fold_ids = sorted({r.fold for r in results})

    rows = []
    for method in dict.fromkeys(r.method for r in results):
        scores = {r.fold: r.set_scores(level) for r in results if r.method == method}
        if level == "per_sample":
            scores = _with_localisation(scores, [r for r in results if r.method == method])
        set_names = list(dict.fromkeys(name for s in scores.values() for name in s))
        for name in set_names:
            located = dict.fromkeys(m for s in scores.values() for m in s.get(name, {}) if m.startswith(LOCALISATION))
            for metric in [*SET_METRICS, *RELIABILITY_METRICS, *located]:
                values = {f: s[name][metric] for f, s in scores.items() if metric in s.get(name, {})}
                if values:
                    rows.append(_row({"method": method, "gene_set": name, "metric": metric}, values, fold_ids))
    return pd.DataFrame(rows)


def _with_localisation(scores: dict, results: list[FoldResult]) -> dict:
    """Set scores per fold with each fold's localisation metrics added under their signature's name (merged
    with a gene set of that name, if any: their metric names differ)."""
    merged = {fold: {name: dict(m) for name, m in sets.items()} for fold, sets in scores.items()}
    for r in results:
        for name, metrics in r.localisation.items():
            merged[r.fold].setdefault(name, {}).update(metrics)
    return merged


def summarise_extra(fold_results: Iterable[FoldResult]) -> pd.DataFrame:
    """One row per (method, extra score): mean and sd (ddof=1) over folds, n_folds, fold columns."""
    results = [r for r in fold_results if r.extra]
    fold_ids = sorted({r.fold for r in results})
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        for score in dict.fromkeys(k for r in mine for k in r.extra):
            values = {r.fold: r.extra[score] for r in mine if score in r.extra}
            rows.append(_row({"method": method, "score": score}, values, fold_ids))
    return pd.DataFrame(rows, columns=["method", "score", "mean", "sd", "n_folds", *map(_fold_column, fold_ids)])
