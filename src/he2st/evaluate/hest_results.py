"""``he2st hest-bench`` result files: results.json, results.csv (one row per task, split and method) and
results.md (task x method, mean ± sd over splits, once scored HEST's way and once he2st's way).

The sd is ``np.std`` with ddof 0 over splits, as HEST's ``merge_fold_results`` reports it, so the
``hest-ridge`` cells read like HEST's leaderboard; the task average is the mean of the task means,
as HEST's ``dataset_results.json`` averages them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st.io import write_json_atomic, write_text_atomic

CSV_COLUMNS = ("task", "split", "method", "score_hest", "score_per_sample")
SCORES = {
    "score_hest": "HEST's score: per gene, Pearson r over all the split's test spots pooled; mean over genes",
    "score_per_sample": "he2st's score: per gene, Pearson r over each held-out sample's spots; mean over genes, "
                        "then over the split's test samples",
}


def summarise_splits(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (task, method): mean and sd (ddof 0) over splits of both scores, and the split count."""
    table = pd.DataFrame(list(rows), columns=list(CSV_COLUMNS))
    out = []
    for (task, method), group in table.groupby(["task", "method"], sort=False):
        record: dict[str, Any] = {"task": task, "method": method, "n_splits": len(group)}
        for score in SCORES:
            values = group[score].to_numpy(np.float64)
            record[f"{score}_mean"] = float(np.mean(values))
            record[f"{score}_sd"] = float(np.std(values))
        out.append(record)
    return pd.DataFrame(out)


def task_average(summary: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Method -> score -> mean over tasks of the task means (HEST's average over datasets, ``np.mean``).

    Every method is averaged over every task of the run: a task where its mean is NaN, or where it was
    skipped, makes its average NaN, as in HEST, rather than an average over fewer (other) tasks that would
    sit beside the other methods' averages as if comparable."""
    tasks = list(dict.fromkeys(summary["task"]))
    out = {}
    for method, group in summary.groupby("method", sort=False):
        by_task = group.set_index("task").reindex(tasks)
        out[method] = {score: float(np.mean(by_task[f"{score}_mean"].to_numpy(np.float64))) for score in SCORES}
    return out


def _cell(mean: float, sd: float) -> str:
    return "nan" if math.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def markdown_table(summary: pd.DataFrame, score: str) -> str:
    """Tasks as rows, methods as columns, ``mean ± sd`` over splits; a last row averages the tasks."""
    methods = list(dict.fromkeys(summary["method"]))
    tasks = list(dict.fromkeys(summary["task"]))
    lookup = {(r.task, r.method): (getattr(r, f"{score}_mean"), getattr(r, f"{score}_sd"))
              for r in summary.itertuples(index=False)}
    lines = ["| task | " + " | ".join(methods) + " |", "|:--|" + "--:|" * len(methods)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_cell(*lookup[(task, m)]) if (task, m) in lookup else "n/a"
                                                 for m in methods) + " |")
    if len(tasks) > 1:
        average = task_average(summary)
        lines.append("| average | " + " | ".join(f"{average[m][score]:.3f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def write_hest_results(out: Path, rows: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]) -> dict[str, Path]:
    """Write results.json (rows with per-gene values, summary, provenance), results.csv and results.md."""
    summary = summarise_splits(rows)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "results.md"}
    write_json_atomic(paths["json"], {
        "provenance": provenance, "scores": SCORES,
        "aggregation": "summary: mean and sd (np.std, ddof 0, as HEST) over splits; average: mean of task means",
        "summary": summary.to_dict(orient="records"), "average": task_average(summary), "splits": list(rows)})
    write_text_atomic(paths["csv"], pd.DataFrame(list(rows), columns=list(CSV_COLUMNS)).to_csv(index=False))
    text = ["# HEST-Benchmark protocol", "",
            f"Mean ± sd over splits. Encoder: {provenance.get('encoder', 'n/a')}. The `hest-ridge` column follows "
            "HEST's linear probe exactly (see docs/hest_bench.md); the others are he2st methods fitted on the "
            "raw embeddings of the same splits and genes, targets log1p of raw counts.", ""]
    for score, meaning in SCORES.items():
        text += [f"## {score}", "", meaning + ".", "", markdown_table(summary, score)]
    notes = provenance.get("notes") or []
    if notes:
        text += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    write_text_atomic(paths["markdown"], "\n".join(text))
    return paths
