"""One self-contained HTML report per prediction: summary, metrics, maps, measured comparison, curves.

The file is meant to be mailed or archived next to a slide, so it has no external assets: figures
are PNGs embedded as base64 data URIs and the styling is inline. Every piece of text that comes
from data (gene names, paths, commands) is HTML-escaped. It says what its numbers mean (units,
metrics), where they fall short (low correlation, smoothed maps) and which files it was built from
(version, date, checksums), so it can be read without the person who made it.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from he2st.data.sample import Sample
from he2st.errors import He2stError
from he2st.io import check_output, input_path, sha256_file, write_text_atomic
from he2st.methods import ModelCard
from he2st.report import plots
from he2st.version import __version__

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;
padding:.25em .6em;text-align:left}th{background:#f4f4f4}img{max-width:100%;height:auto}.note{color:#666;
font-size:.85em}code{background:#f4f4f4;padding:0 .2em}.warn{background:#fff4e5;border-left:4px solid #e69500;
padding:.5em .8em;margin:.8em 0}dt{font-weight:600;margin-top:.4em}dd{margin-left:1.2em}
"""
_METRICS = ("pearson_mean", "pearson_median", "spearman_mean", "mse", "mae")
LOW_R = 0.1  # mean per-gene r below this: the maps are hypotheses, not measurements
SMOOTHER = 0.05  # predicted median Moran's I above the measured one by more than this: warn
MORAN_K = 6  # neighbours of a spot for Moran's I (the hex grid's first ring)


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


def _note(markup: str) -> str:
    """A grey explanatory paragraph (``markup`` is HTML: escape data in it)."""
    return f'<p class="note">{markup}</p>'


def _warn(text: str) -> str:
    """A highlighted caution box (``text`` is escaped)."""
    return f'<div class="warn">{_e(text)}</div>'


def trained_on(meta: dict, card: ModelCard | None) -> str | None:
    """'B4 (patient B), C2 (patient C)' from ``uns["he2st"]["trained_on"]`` (a mapping sample -> patient;
    older files hold it as a JSON string) or else the model card; None when neither says."""
    samples = meta.get("trained_on")
    if isinstance(samples, str):
        samples = json.loads(samples) if samples.strip() else None
    if not samples and card is not None:
        samples = card.training_samples
    if not samples:
        return None
    return ", ".join(f"{s} (patient {p})" for s, p in sorted(dict(samples).items()))


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
    if (line := trained_on(meta, card)) is not None:
        rows.append(["trained on", line])
    return _table(["", "value"], rows)


def _reliability(adata: ad.AnnData, genes: list[str]) -> str:
    """What the model measured of itself on held-out training patients: the genes shown and the most
    predictable, the intervals' level and width, and the spots flagged out of distribution."""
    var = adata.var
    order = var["expected_r"].sort_values(ascending=False, na_position="last").index[:10]
    rows = [[g, f"{var.at[g, 'expected_r']:.2f}", f"{var.at[g, 'expected_r_low']:.2f}",
             "shown below" if g in genes else ""] for g in order]
    lines = [_note("Expected per-gene Pearson on a patient the model has not seen, and a one-sided 90% lower bound, "
                   "measured on held-out training patients. Read maps of genes with a low bound as noise.")]
    lines.append(_table(["gene", "expected r", "lower bound", ""], rows))
    reliable = int((var["expected_r_low"] > 0.1).sum())
    facts = [f"{reliable} of {adata.n_vars} genes have a lower bound above 0.1."]
    meta = dict(adata.uns.get("he2st", {}))
    if "lower" in adata.layers and "upper" in adata.layers:
        width = float(np.nanmean(np.asarray(adata.layers["upper"]) - np.asarray(adata.layers["lower"])))
        facts.append(f"Each spot and gene has a {float(meta.get('coverage', 0.9)):.0%} conformal interval "
                     f"(layers lower/upper; mean width {width:.2f} on the target scale).")
    if "in_distribution" in adata.obs:
        flagged = 1.0 - float(np.nanmean(adata.obs["in_distribution"].to_numpy(dtype=np.float64)))
        facts.append(f"{flagged:.0%} of the spots are out of distribution (unlike every training patient's images).")
    return "".join(lines) + _note(" ".join(facts))


def _checksum(source: Any) -> str:
    """sha256 of a file given by path; objects passed in memory have no file to vouch for."""
    return sha256_file(source) if isinstance(source, str | Path) else "not computed (passed in memory, not a file)"


def _provenance(prediction: Any, sample: Any, card: ModelCard | None) -> str:
    """Which software and files the report was built from, so an archived copy can be checked against them."""
    rows = [["he2st version", __version__],
            ["written", datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()],
            ["prediction sha256", _checksum(prediction)]]
    if sample is not None:
        rows.append(["sample sha256", _checksum(sample)])
    if card is not None and card.weights_sha256:
        rows.append(["encoder weights sha256", card.weights_sha256])
    return _table(["", "value"], rows)


def _glossary(adata: ad.AnnData) -> str:
    """What each metric measures and in which units (MSE/MAE are on the model's target scale)."""
    kind = plots.target_transform(adata)
    label, meaning = plots.SCALES.get(kind, (kind, ""))
    items = {
        "expression scale": f"{label}{f' = {meaning}' if meaning else ''}; maps, MSE and MAE use it.",
        "Pearson r (pearson_mean, pearson_median)": (
            "correlation of predicted and measured expression of one gene across the spots of a section "
            "(1 = same pattern, 0 = unrelated; blind to offset and scale), then the mean or median over the genes "
            "of a set."),
        "Spearman (spearman_mean)": "the same on ranks: robust to outlier spots and monotone distortions.",
        "MSE": f"mean squared error per gene across spots, averaged over genes, in ({label})² units.",
        "MAE": f"mean absolute error per gene across spots, averaged over genes, in {label} units.",
        "gene sets": (
            "all = every predicted gene; heg50 / hvg50 (HEG-50 / HVG-50) = the 50 most expressed / most variable "
            "genes, chosen on the training data; *_testselected = chosen on the test sample itself, as some papers "
            "do (optimistic)."),
    }
    return "<dl>" + "".join(f"<dt>{_e(t)}</dt><dd>{_e(d)}</dd>" for t, d in items.items()) + "</dl>"


def _load_results(results: str | Path | dict | None) -> dict | None:
    if results is None or isinstance(results, dict):
        return results
    path = input_path(results, "results file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise He2stError(f"not a JSON results file ({exc})", path) from exc


def _metrics_table(doc: dict) -> str:
    records = doc.get("summary") or []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    with_sd = False  # the caption promises an sd only when one is shown (a single fold has none)
    for r in records:
        if r.get("metric") in _METRICS:
            sd = r.get("sd")
            has_sd = sd is not None and np.isfinite(float(sd))
            with_sd |= has_sd
            text = _fmt(r.get("mean")) + (f" ± {_fmt(sd)}" if has_sd else "")
            cells.setdefault((str(r.get("method")), str(r.get("gene_set"))), {})[r["metric"]] = text
    if not cells:
        return _note("The results file has no summary metrics.")
    metrics = [m for m in _METRICS if any(m in v for v in cells.values())]
    rows = [[m, s, *[v.get(k, "") for k in metrics]] for (m, s), v in cells.items()]
    command = doc.get("provenance", {}).get("command")
    source = f"From <code>{_e(command)}</code>; " if command else ""
    what = "mean ± sd over folds" if with_sd else "mean over folds (no sd: a single fold, or none recorded)"
    return _table(["method", "gene set", *metrics], rows) + _note(f"{source}{what}.")


def _measured(adata: ad.AnnData, sample: Sample, genes: list[str]) -> list[str]:
    """Predicted vs measured: per-gene r (table, histogram, caution when low), maps on shared colour scales,
    and spatial autocorrelation of both (predictions smoother than the tissue mislead SVG analyses)."""
    paired = plots.pair_with_measured(adata, sample)
    scale = plots.scale_label(adata)
    r = np.array(list(paired.pearson.values()), dtype=np.float64)
    mean_r = float(np.nanmean(r))
    ranked = sorted(paired.pearson.items(), key=lambda kv: -np.nan_to_num(kv[1], nan=-2))
    parts = [f"<h2>Predicted vs measured ({_e(sample.sample_id)})</h2>",
             (f"<p>{len(paired.xy)} spots matched by {_e(paired.matched_by)}; {len(r)} genes; per-gene Pearson r: "
              f"mean {_fmt(mean_r)}, median {_fmt(np.nanmedian(r))}.</p>")]
    if mean_r < LOW_R:
        parts.append(_warn(f"Mean per-gene r is {_fmt(mean_r)} (below {LOW_R}): the predictions explain little of "
                           "the measured variation; treat the maps as hypotheses, not measurements."))
    parts += [
        _table(["gene", "Pearson r"], [[g, _fmt(v)] for g, v in ranked[:10]] + (
            [["…", ""]] + [[g, _fmt(v)] for g, v in ranked[-5:]] if len(ranked) > 15 else [])),
        _img(plots.pearson_histogram(paired), "per-gene Pearson r"),
        _img(plots.measured_scatter(paired, genes, scale=scale), "scatter"),
        _note(f"Predicted and measured maps of a gene share one colour scale (1st-99th percentile of both, "
              f"{_e(scale)}): a prediction with too little contrast looks washed out."),
        _img(plots.predicted_vs_measured(paired, plots.spatial_view(adata), genes[:4], scale=scale), "compare"),
    ]
    pred_i = float(np.nanmedian(plots.morans_i(paired.predicted, paired.xy, MORAN_K)))
    meas_i = float(np.nanmedian(plots.morans_i(paired.measured, paired.xy, MORAN_K)))
    parts += ["<h3>Spatial autocorrelation</h3>",
              _note(f"Moran’s I per gene ({MORAN_K} nearest spots, row-standardised weights; 0 = no spatial "
                    "pattern), median over genes, at the matched spots."),
              _table(["", "predicted", "measured"], [["median Moran’s I", _fmt(pred_i), _fmt(meas_i)]])]
    if pred_i - meas_i > SMOOTHER:
        parts.append(_warn(f"Predicted maps are spatially smoother than the measurements (median Moran’s I "
                           f"{_fmt(pred_i)} vs {_fmt(meas_i)}): neighbouring spots share image context, so the "
                           "predictions carry spatial structure the tissue does not show. Do not run spatially "
                           "variable gene analysis on these predictions without stating that caveat."))
    return parts


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
    check_output(out)  # before any work: a file he2st did not write is refused
    card = model_card(adata)
    doc = _load_results(results)
    genes = genes or plots.default_genes(adata, n_genes)
    library = plots.spatial_view(adata).library_id
    title = title or f"he2st prediction: {library}"
    parts = [f"<h1>{_e(title)}</h1>", "<h2>Data</h2>", _summary(adata, card)]
    if doc is not None or sample is not None:
        parts += ["<h2>What the numbers mean</h2>", _glossary(adata)]
    if doc is not None:
        parts += ["<h2>Benchmark metrics</h2>", _metrics_table(doc)]
    if "expected_r" in adata.var:
        parts += ["<h2>How far to trust it</h2>", _reliability(adata, genes)]
    parts += ["<h2>Predicted expression</h2>",
              _note("Spots drawn at their true size over the H&amp;E; colour scale 1st-99th percentile per gene, "
                    f"in {_e(plots.scale_label(adata))} (the model's target scale)."),
              _img(plots.expression_maps(adata, genes), "maps")]
    if sample is not None:
        parts += _measured(adata, Sample.load(sample) if isinstance(sample, str | Path) else sample, genes)
    found = _find_curves({"curves": card.curves} if card is not None else None) | _find_curves(doc)
    if found:
        parts += ["<h2>Training curves</h2>", _img(plots.training_curves(found), "curves")]
    unc = plots.uncertainty_map(adata)
    if unc is not None:
        parts += ["<h2>Uncertainty</h2>", _note("An out-of-distribution score above 1, low similarity to every "
                                                "reference spot or widely spread retrieved profiles mark spots where "
                                                "the prediction deserves less trust."),
                  _img(unc, "uncertainty")]
    parts += ["<h2>Provenance</h2>", _provenance(prediction, sample, card)]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    out = Path(out)
    write_text_atomic(out, page)
    return out
