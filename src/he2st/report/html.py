"""One self-contained HTML report per prediction: summary, metrics, maps, measured comparison, curves.

The file is meant to be mailed or archived next to a slide, so it has no external assets: figures
are PNGs embedded as base64 data URIs and the styling is inline. Every piece of text that comes
from data (gene names, paths, commands) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from he2st.data.sample import Sample
from he2st.errors import He2stError
from he2st.io import write_text_atomic
from he2st.methods import ModelCard
from he2st.report import plots

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;
padding:.25em .6em;text-align:left}th{background:#f4f4f4}img{max-width:100%;height:auto}.note{color:#666;
font-size:.85em}code{background:#f4f4f4;padding:0 .2em}
"""
_METRICS = ("pearson_mean", "pearson_median", "spearman_mean", "mse", "mae")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _img(fig, alt: str) -> str:
    data = base64.b64encode(plots.figure_png(fig)).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "nan" if not np.isfinite(v) else f"{v:.3f}"


def model_card(adata: ad.AnnData) -> ModelCard | None:
    """The model card a prediction file carries (``uns["he2st"]["card"]``), if any."""
    text = dict(adata.uns.get("he2st", {})).get("card")
    return ModelCard.model_validate_json(text) if text else None


def _summary(adata: ad.AnnData, card: ModelCard | None) -> str:
    meta = dict(adata.uns.get("he2st", {}))
    rows = [["spots", adata.n_obs], ["genes", adata.n_vars]]
    for key, label in [("slide", "slide"), ("mpp", "µm / px (level 0)"), ("spots", "spot positions"),
                       ("pitch_um", "grid pitch (µm)"), ("tissue", "tissue area"), ("method", "method"),
                       ("model", "model"), ("encoder", "encoder"), ("target_transform", "target scale")]:
        if key in meta:
            value = meta[key]
            if key == "pitch_um" and not value:  # stored as 0 when spots came from a sample (no regular grid)
                value = "irregular (a sample's own spots)"
            rows.append([label, value])
    if card is not None:
        rows.append(["trained on", card.training_line()])
    return _table(["", "value"], rows)


def _load_results(results: str | Path | dict | None) -> dict | None:
    if results is None or isinstance(results, dict):
        return results
    path = Path(results)
    if not path.is_file():
        raise He2stError("results file not found", path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise He2stError(f"not a JSON results file ({exc})", path) from exc


def _metrics_table(doc: dict) -> str:
    records = doc.get("summary") or []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in records:
        if r.get("metric") in _METRICS:
            sd = r.get("sd")
            text = _fmt(r.get("mean")) + ("" if sd is None or not np.isfinite(float(sd)) else f" ± {_fmt(sd)}")
            cells.setdefault((str(r.get("method")), str(r.get("gene_set"))), {})[r["metric"]] = text
    if not cells:
        return '<p class="note">The results file has no summary metrics.</p>'
    metrics = [m for m in _METRICS if any(m in v for v in cells.values())]
    rows = [[m, s, *[v.get(k, "") for k in metrics]] for (m, s), v in cells.items()]
    command = doc.get("provenance", {}).get("command")
    note = f'<p class="note">From <code>{_e(command)}</code>; mean ± sd over folds.</p>' if command else ""
    return _table(["method", "gene set", *metrics], rows) + note


def _find_curves(doc: dict | None) -> dict[str, list[float]]:
    """Curves stored in a results file: top-level ``curves`` or per fold (``folds[i].curves``)."""
    if not doc:
        return {}
    found: dict[str, list[float]] = {}

    def add(prefix: str, curves: Any) -> None:
        if isinstance(curves, dict):
            for name, values in curves.items():
                if isinstance(values, list) and values and all(isinstance(v, int | float) for v in values):
                    found[f"{prefix}{name}"] = [float(v) for v in values]
                elif isinstance(values, dict):
                    add(f"{prefix}{name}/", values)

    add("", doc.get("curves"))
    for fold in doc.get("folds", []) or []:
        if isinstance(fold, dict) and "curves" in fold:
            add(f"{fold.get('method', '')}/{fold.get('fold', '')}/", fold["curves"])
    return found


def build_report(
    prediction: str | Path | ad.AnnData,
    out: str | Path,
    sample: Sample | str | Path | None = None,
    results: str | Path | dict | None = None,
    genes: list[str] | None = None,
    title: str | None = None,
    n_genes: int = 6,
) -> Path:
    """Write one HTML file: summary, metrics (``results.json``), maps, measured comparison, curves, uncertainty.

    ``sample``: a measured sample (Sample or he2st ``.h5ad``) for per-gene Pearson, scatter plots
    and side-by-side maps. Training curves come from the prediction's model card, or from ``results``.
    """
    adata = plots.load_prediction(prediction)
    card = model_card(adata)
    doc = _load_results(results)
    genes = genes or plots.default_genes(adata, n_genes)
    library = plots.spatial_view(adata).library_id
    title = title or f"he2st prediction: {library}"
    parts = [f"<h1>{_e(title)}</h1>", "<h2>Data</h2>", _summary(adata, card)]
    if doc is not None:
        parts += ["<h2>Benchmark metrics</h2>", _metrics_table(doc)]
    parts += ["<h2>Predicted expression</h2>",
              '<p class="note">Spots drawn at their true size over the H&amp;E; colour scale 1st-99th percentile '
              "per gene, on the model's target scale.</p>", _img(plots.expression_maps(adata, genes), "maps")]
    if sample is not None:
        sample = Sample.load(sample) if isinstance(sample, str | Path) else sample
        paired = plots.pair_with_measured(adata, sample)
        r = np.array(list(paired.pearson.values()), dtype=np.float64)
        ranked = sorted(paired.pearson.items(), key=lambda kv: -np.nan_to_num(kv[1], nan=-2))
        parts += [
            f"<h2>Predicted vs measured ({_e(sample.sample_id)})</h2>",
            f"<p>{len(paired.xy)} spots matched by {_e(paired.matched_by)}; {len(r)} genes; per-gene Pearson r: "
            f"mean {_fmt(np.nanmean(r))}, median {_fmt(np.nanmedian(r))}.</p>",
            _table(["gene", "Pearson r"], [[g, _fmt(v)] for g, v in ranked[:10]] + (
                [["…", ""]] + [[g, _fmt(v)] for g, v in ranked[-5:]] if len(ranked) > 15 else [])),
            _img(plots.measured_scatter(paired, genes), "scatter"),
            _img(plots.predicted_vs_measured(paired, plots.spatial_view(adata), genes[:4]), "compare"),
        ]
    found = _find_curves({"curves": card.curves} if card is not None else None) | _find_curves(doc)
    if found:
        parts += ["<h2>Training curves</h2>", _img(plots.training_curves(found), "curves")]
    unc = plots.uncertainty_map(adata)
    if unc is not None:
        parts += ["<h2>Uncertainty</h2>", '<p class="note">Low similarity to every reference spot or widely '
                  "spread retrieved profiles mark spots where the prediction deserves less trust.</p>",
                  _img(unc, "uncertainty")]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    out = Path(out)
    write_text_atomic(out, page)
    return out
