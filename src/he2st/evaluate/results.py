"""Result files of a run: results.json (scores, curves, provenance), summary.csv, per_gene.csv, results.md.

Every file is written to a temporary file beside it and renamed into place, so an interrupted run
leaves either the old file or the complete new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from he2st.evaluate.scoring import FoldResult, summarise, summarise_extra
from he2st.evaluate.tables import localisation_markdown, markdown_report
from he2st.io import check_folder, check_output, jsonable, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from he2st.evaluate.tls_benchmark import TlsReport

__all__ = ["check_results_folder", "result_paths", "write_results"]


def result_paths(out_dir: str | Path) -> dict[str, Path]:
    """The files :func:`write_results` writes, keyed "json", "summary", "per_gene", "markdown"."""
    out = Path(out_dir)
    return {"json": out / "results.json", "summary": out / "summary.csv", "per_gene": out / "per_gene.csv",
            "markdown": out / "results.md"}


def check_results_folder(out_dir: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Before a run's work: refuse (one line) a results folder he2st cannot write, or result files in it that
    he2st did not write (:func:`he2st.io.check_output`)."""
    check_folder(out_dir)
    for path in [*result_paths(out_dir).values(), *(Path(out_dir) / name for name in extra)]:
        check_output(path)


def _fold_record(r: FoldResult) -> dict[str, Any]:
    return {
        "method": r.method,
        "fold": r.fold,
        "test_samples": r.test_samples,
        "fold_scores": r.set_scores("per_sample"),
        "per_sample": r.per_sample,
        "pooled": r.pooled,
        "extra": r.extra,
        "localisation": r.localisation,
        "notes": r.notes,
        "curves": r.curves,
        "selection": r.selection,
        "per_gene": {c: r.per_gene[c].tolist() for c in r.per_gene.columns},
    }


def write_results(
    out_dir: str | Path, fold_results: Iterable[FoldResult], provenance: Mapping[str, Any],
    tls: TlsReport | None = None,
) -> dict[str, Path]:
    """Write results.json, summary.csv, per_gene.csv and results.md into ``out_dir``.

    ``provenance`` (command, config, package version, data checksums, ...) is stored verbatim
    in results.json; ``tls`` (the benchmark's TLS scores) goes under its ``tls`` key and into results.md.
    Every file is written to a temporary file beside it and renamed into
    place, so an interrupted run leaves either the old file or the complete new one.
    Returns the written paths keyed "json", "summary", "per_gene", "markdown".
    """
    results = list(fold_results)
    summary = summarise(results)
    pooled = summarise(results, level="pooled")
    extra = summarise_extra(results)
    document = jsonable(
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
        } | ({"tls": tls.document()} if tls is not None else {})
    )
    per_gene = pd.concat(
        [r.per_gene.assign(method=r.method, fold=r.fold) for r in results], ignore_index=True
    )
    per_gene = per_gene[["method", "fold", *[c for c in per_gene.columns if c not in ("method", "fold")]]]

    paths = result_paths(out_dir)
    write_json_atomic(paths["json"], document)
    write_text_atomic(paths["summary"], summary.to_csv(index=False))
    write_text_atomic(paths["per_gene"], per_gene.to_csv(index=False))
    tls_section = None if tls is None else (
        f"TLS score of each held-out sample (model {tls.source}) from predicted vs measured expression: Pearson r "
        "across its spots and AUROC for its spots in the measured top decile, mean ± sd over folds; the ridge probe "
        "predicts the score from image features, fitted on training patients only.\n\n" + tls.markdown())
    write_text_atomic(paths["markdown"], markdown_report(summary, provenance, extra, tls_section,
                                                         localisation_section(summary, results)))
    return paths


def localisation_section(summary: pd.DataFrame, results: list[FoldResult]) -> str | None:
    """results.md's cancer-localisation section: what the rows mean, the tables and each fold's notes."""
    tables = localisation_markdown(summary)
    if not tables:
        return None
    notes = {str(r.fold): r.notes["localisation"] for r in results if r.notes.get("localisation")}
    return ("How well a biomarker score separates cancer spots (invasive cancer, cancer in situ) from other "
            "labelled tissue in each held-out sample with pathologist region labels: AUROC and average precision "
            "(AP) of the score from predicted expression (`localisation_auroc`, `localisation_ap`), from measured "
            "expression on the same genes (`*_measured`, the reference; smoother predictions can exceed it) and "
            "of a logistic-regression probe on the image features fitted on training patients' labelled spots "
            "(`*_image`, the floor); `localisation_cancer_share` is the AP of a random score. Mean ± sd over the "
            "folds with labelled test samples (see `n_folds` in summary.csv).\n\n" + tables
            + "".join(f"- {fold}: {note}\n" for fold, note in notes.items()))
