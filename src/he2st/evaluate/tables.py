"""Turn per-sample scores into fold scores, cross-fold summaries and result files.

Aggregation follows HEST/BLEEP: within a held-out sample, each gene's Pearson correlation
is taken across that sample's spots and averaged over a gene set; a fold's score for the
set is the mean of those per-sample set means over the fold's test samples (each sample
counts once, however many spots it has). The summary reports mean and sd of fold scores.
Scores pooled over all of a fold's test spots are kept alongside, since some papers report
those instead, but they are not the headline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from he2st.errors import He2stError
from he2st.evaluate.metrics import SET_METRICS, evaluate_sample
from he2st.io import atomic_path

__all__ = ["FoldResult", "evaluate_fold", "extra_markdown", "summarise", "summarise_extra", "to_markdown",
           "write_results"]

Level = Literal["per_sample", "pooled"]

#: Metrics shown as tables in results.md (counts stay in the CSV and JSON).
_MARKDOWN_METRICS = ("pearson_mean", "pearson_median", "spearman_mean", "gene_gene_corr", "mse", "mae")


@dataclass
class FoldResult:
    """The scores of one method on one cross-validation fold.

    ``per_sample`` maps test sample -> gene set -> metric (keys of ``SET_METRICS``);
    ``pooled`` maps gene set -> metric computed once on all the fold's test spots stacked;
    ``per_gene`` has one row per (sample, gene) with pearson, spearman, mse, mae;
    ``extra`` holds fold-level scores beyond the panel (whole transcriptome, cell-type proportions).
    """

    method: str
    fold: int | str
    test_samples: list[str]
    per_sample: dict[str, dict[str, dict[str, float]]]
    pooled: dict[str, dict[str, float]]
    per_gene: pd.DataFrame
    extra: dict[str, float] = field(default_factory=dict)

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
    keys = ["sample", "gene"]
    per_gene = pd.concat([r.per_gene for r in results]).groupby(keys, sort=False).mean(numeric_only=True).reset_index()
    extra = {k: float(np.mean([r.extra[k] for r in results])) for k in first.extra}
    return FoldResult(first.method, first.fold, list(first.test_samples), per_sample, pooled, per_gene, extra)


def _fold_column(fold: int | str) -> str:
    return f"fold_{fold}"


def summarise(fold_results: Iterable[FoldResult], level: Level = "per_sample") -> pd.DataFrame:
    """One row per (method, gene_set, metric): mean and sd of the fold scores, n_folds, and
    one ``fold_<id>`` column per fold.

    sd uses ddof=1 (folds are a sample of possible splits) and is NaN with a single fold;
    a NaN fold score propagates to the mean so a failed fold cannot disappear from view.
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
        set_names = list(dict.fromkeys(name for s in scores.values() for name in s))
        for name in set_names:
            for metric in SET_METRICS:
                values = {f: s[name][metric] for f, s in scores.items() if metric in s.get(name, {})}
                if not values:
                    continue
                v = np.array(list(values.values()), dtype=np.float64)
                row: dict[str, Any] = {
                    "method": method,
                    "gene_set": name,
                    "metric": metric,
                    "mean": float(v.mean()),
                    "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                    "n_folds": int(v.size),
                }
                row.update({_fold_column(f): values.get(f, float("nan")) for f in fold_ids})
                rows.append(row)
    return pd.DataFrame(rows)


def summarise_extra(fold_results: Iterable[FoldResult]) -> pd.DataFrame:
    """One row per (method, extra score): mean and sd (ddof=1) over folds, n_folds, fold columns."""
    results = [r for r in fold_results if r.extra]
    fold_ids = sorted({r.fold for r in results})
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        for score in dict.fromkeys(k for r in mine for k in r.extra):
            values = {r.fold: r.extra[score] for r in mine if score in r.extra}
            v = np.array(list(values.values()), dtype=np.float64)
            row: dict[str, Any] = {"method": method, "score": score, "mean": float(v.mean()),
                                   "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                                   "n_folds": int(v.size)}
            row.update({_fold_column(f): values.get(f, float("nan")) for f in fold_ids})
            rows.append(row)
    return pd.DataFrame(rows, columns=["method", "score", "mean", "sd", "n_folds", *map(_fold_column, fold_ids)])


def extra_markdown(df: pd.DataFrame) -> str:
    """Methods x extra scores (``mean ± sd`` over folds); counts and thresholds shown as plain numbers."""
    scores = list(dict.fromkeys(df["score"]))
    lookup = {(r.method, r.score): (r.mean, r.sd) for r in df.itertuples(index=False)}

    def cell(method: str, score: str) -> str:
        if (method, score) not in lookup:
            return "n/a"
        mean, sd = lookup[(method, score)]
        if score.endswith(("_predicted", "_scored", "_constant", "_threshold")):
            return f"{mean:g}"
        return _cell(mean, sd)

    body = [[m, *(cell(m, s) for s in scores)] for m in dict.fromkeys(df["method"])]
    return _markdown_table(["method", *scores], body)


def _cell(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A padded GitHub-style table; the first column left-aligned, the rest right-aligned."""
    escaped = [[c.replace("|", "\\|") for c in row] for row in [header, *body]]
    widths = [max(3, *(len(row[i]) for row in escaped)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        ":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(escaped[0]), rule, *(line(r) for r in escaped[1:])]) + "\n"


def to_markdown(
    df: pd.DataFrame, metric: str = "pearson_mean", sets: Sequence[str] = ("all", "heg50", "hvg50")
) -> str:
    """Methods x gene sets for one metric, each cell ``mean ± sd`` over folds.

    A single-fold cell shows the mean alone; a set the method was not scored on shows n/a.
    """
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise He2stError(f"metric {metric!r} is not in the summary; it has {sorted(set(df['metric']))}")
    lookup = {(r.method, r.gene_set): (r.mean, r.sd) for r in rows.itertuples(index=False)}
    body = [
        [method, *(_cell(*lookup[(method, s)]) if (method, s) in lookup else "n/a" for s in sets)]
        for method in dict.fromkeys(rows["method"])
    ]
    return _markdown_table(["method", *sets], body)


def _jsonable(value: Any, where: str = "results") -> Any:
    """Plain JSON types, with NaN/inf as null so the file is valid JSON for any reader."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise He2stError(f"{where} has a value of type {type(value).__name__} that cannot be written as JSON")


def _fold_record(r: FoldResult) -> dict[str, Any]:
    return {
        "method": r.method,
        "fold": r.fold,
        "test_samples": r.test_samples,
        "fold_scores": r.set_scores("per_sample"),
        "per_sample": r.per_sample,
        "pooled": r.pooled,
        "extra": r.extra,
        "per_gene": {c: r.per_gene[c].tolist() for c in r.per_gene.columns},
    }


def _markdown_report(summary: pd.DataFrame, provenance: Mapping[str, Any], extra: pd.DataFrame) -> str:
    sets = list(dict.fromkeys(summary["gene_set"]))
    parts = [
        "# he2st evaluation results\n",
        "Each cell: mean ± sd (ddof=1) over folds. A fold's score for a gene set is the mean over "
        "its held-out samples of the per-sample set mean, where each gene's score is taken across "
        "the spots of one sample. Gene sets are chosen on training spots only; sets named "
        "`*_testselected` were chosen on the test sample (as BLEEP/CMRCNet report) and are shown "
        "only for comparison with published numbers.\n",
    ]
    scalars = {k: v for k, v in provenance.items() if isinstance(v, (str, int, float, bool, Path))}
    if scalars:
        parts.append("\n".join(f"- {k}: `{v}`" for k, v in scalars.items()) + "\n")
        parts.append("Full provenance is in `results.json`.\n")
    for metric in _MARKDOWN_METRICS:
        if metric in set(summary["metric"]):
            parts.append(f"## {metric}\n\n" + to_markdown(summary, metric, sets))
    if not extra.empty:
        parts.append(
            "## beyond the panel\n\nWhole-transcriptome retrieval (genes measured in every training sample; "
            "scored: mean training expression >= threshold) and cell-type proportions predicted from the "
            "image (Pearson per type across a test sample's spots). Mean ± sd over folds.\n\n"
            + extra_markdown(extra)
        )
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_results(
    out_dir: str | Path, fold_results: Iterable[FoldResult], provenance: Mapping[str, Any]
) -> dict[str, Path]:
    """Write results.json, summary.csv, per_gene.csv and results.md into ``out_dir``.

    ``provenance`` (command, config, package version, data checksums, ...) is stored verbatim
    in results.json. Every file is written to a temporary file beside it and renamed into
    place, so an interrupted run leaves either the old file or the complete new one.
    Returns the written paths keyed "json", "summary", "per_gene", "markdown".
    """
    results = list(fold_results)
    summary = summarise(results)
    pooled = summarise(results, level="pooled")
    extra = summarise_extra(results)
    document = _jsonable(
        {
            "provenance": provenance,
            "aggregation": (
                "fold score = mean over the fold's test samples of the per-sample gene-set mean; "
                "summary = mean and sd (ddof=1) of fold scores; summary_pooled uses scores "
                "computed on all of a fold's test spots stacked"
            ),
            "summary": summary.to_dict(orient="records"),
            "summary_pooled": pooled.to_dict(orient="records"),
            "summary_extra": extra.to_dict(orient="records"),
            "folds": [_fold_record(r) for r in results],
        }
    )
    per_gene = pd.concat(
        [r.per_gene.assign(method=r.method, fold=r.fold) for r in results], ignore_index=True
    )
    per_gene = per_gene[["method", "fold", *[c for c in per_gene.columns if c not in ("method", "fold")]]]

    out = Path(out_dir)
    paths = {
        "json": out / "results.json",
        "summary": out / "summary.csv",
        "per_gene": out / "per_gene.csv",
        "markdown": out / "results.md",
    }
    _write_atomic(paths["json"], json.dumps(document, indent=2, allow_nan=False) + "\n")
    _write_atomic(paths["summary"], summary.to_csv(index=False))
    _write_atomic(paths["per_gene"], per_gene.to_csv(index=False))
    _write_atomic(paths["markdown"], _markdown_report(summary, provenance, extra))
    return paths
