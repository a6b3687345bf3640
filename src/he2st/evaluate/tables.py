"""Result tables as markdown: methods x gene sets (``mean ± sd`` over folds) and the results.md report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from he2st.errors import He2stError
from he2st.evaluate.reliability import RELIABILITY_METRICS
from he2st.evaluate.scoring import LOCALISATION

__all__ = ["extra_markdown", "localisation_markdown", "markdown_report", "reliability_markdown", "to_markdown"]

#: Metrics shown as tables in results.md (counts stay in the CSV and JSON).
_MARKDOWN_METRICS = ("pearson_mean", "pearson_median", "spearman_mean", "gene_gene_corr", "mse", "mae")


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


def reliability_markdown(summary: pd.DataFrame) -> str:
    """Methods x reliability metrics (gene set ``all``), or '' when no method was calibrated."""
    rows = summary[(summary["gene_set"] == "all") & summary["metric"].isin(RELIABILITY_METRICS)]
    if rows.empty:
        return ""
    metrics = [m for m in RELIABILITY_METRICS if m in set(rows["metric"])]
    lookup = {(r.method, r.metric): (r.mean, r.sd) for r in rows.itertuples(index=False)}
    body = [[method, *(_cell(*lookup[(method, m)]) if (method, m) in lookup else "n/a" for m in metrics)]
            for method in dict.fromkeys(rows["method"])]
    return _markdown_table(["method", *metrics], body)


def localisation_markdown(summary: pd.DataFrame) -> str:
    """Per signature, methods x localisation metrics (``mean ± sd`` over the folds that scored it); '' if none."""
    rows = summary[summary["metric"].astype(str).str.startswith(LOCALISATION)]
    return "".join(f"Signature `{name}`:\n\n" + extra_markdown(group.rename(columns={"metric": "score"})) + "\n"
                   for name, group in rows.groupby("gene_set", sort=False))


def markdown_report(summary: pd.DataFrame, provenance: Mapping[str, Any], extra: pd.DataFrame,
                    tls: str | None = None, localisation: str | None = None) -> str:
    """results.md: the gene-set tables, scores beyond the panel and, when given, the localisation and TLS
    sections."""
    sets = list(dict.fromkeys(summary.loc[~summary["metric"].astype(str).str.startswith(LOCALISATION), "gene_set"]))
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
    reliability = reliability_markdown(summary)
    if reliability:
        parts.append(
            "## reliability\n\nWhat the model said of itself, measured only on its training patients' inner folds, "
            "checked on the held-out samples (gene set `all`, mean ± sd over folds). `coverage90`: fraction of "
            "measured values inside the 90% conformal intervals (target 0.9); `interval_width90`: their mean "
            "width, on the panel's scale; `*_constant`: the same for constant-width conformal intervals, the "
            "baseline; `predictability_spearman`: Spearman across genes of expected vs realised per-gene r; "
            "`ood_auroc`: how well the out-of-distribution score finds the top decile of spots by mean "
            "absolute error (0.5: chance); `ood_fraction`: spots flagged out of distribution.\n\n" + reliability)
    if not extra.empty:
        parts.append(
            "## beyond the panel\n\nWhole-transcriptome retrieval (genes measured in every training sample; "
            "scored: mean training expression >= threshold) and cell-type proportions predicted from the "
            "image (Pearson per type across a test sample's spots). Mean ± sd over folds.\n\n"
            + extra_markdown(extra)
        )
    if localisation:
        parts.append("## cancer localisation\n\n" + localisation)
    if tls:
        parts.append("## TLS detection\n\n" + tls)
    return "\n".join(parts)
