"""Figures of predicted expression: maps over the H&E, predicted vs measured, uncertainty, curves.

Everything reads the prediction ``.h5ad`` written by ``he2st predict`` (or any AnnData in the
scverse spatial layout), so the same figures work for predictions and for measured samples.
Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot): no GUI backend and
no global state, which matters when a report builds dozens of them in one process.
Measured expression is put on the model's target scale (``uns["he2st"]["target_transform"]``), so
predicted and measured values are in the same units and their maps share one colour scale per gene;
colour bars name that scale.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure
from PIL import Image
from scipy.spatial import cKDTree

from he2st.data.genes import transform_counts
from he2st.data.sample import Sample
from he2st.errors import He2stError
from he2st.evaluate.metrics import pearson_per_gene
from he2st.io import atomic_path, check_folder, check_output, read_spots_h5ad, sha256_file

UNCERTAINTY_KEYS = ("ood_score", "best_similarity", "dispersion")
#: target transform -> (colour-bar label, what it means)
SCALES = {"log1p_cp10k": ("log1p CP10k", "ln(1 + counts per 10,000 counts of the spot)"),
          "log1p": ("log1p counts", "ln(1 + raw counts)")}
EXPRESSED = 0.01  # a spot expresses a gene above this value (target scale; far below one count, above float noise)
MIN_EXPRESSED_FRACTION = 0.1  # genes expressed in fewer spots make empty maps, however variable


# ---------------------------------------------------------------------------- inputs
def load_prediction(prediction: str | Path | ad.AnnData) -> ad.AnnData:
    """A prediction AnnData from a path (errors name the file) or as given."""
    if isinstance(prediction, ad.AnnData):
        return prediction
    return read_spots_h5ad(prediction, "prediction file")


@dataclass
class SpatialView:
    """What a map needs: background image, its scale, spot centres and diameter (level-0 px)."""

    image: np.ndarray | None
    scale: float
    xy: np.ndarray
    diameter: float
    library_id: str


def spatial_view(adata: ad.AnnData, library_id: str | None = None) -> SpatialView:
    if "spatial" not in adata.obsm:
        raise He2stError("AnnData has no obsm['spatial'] spot coordinates")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    libraries = dict(adata.uns.get("spatial", {}))
    if library_id is None and libraries:
        library_id = next(iter(libraries))
    lib = libraries.get(library_id, {}) if library_id is not None else {}
    images = lib.get("images", {})
    factors = lib.get("scalefactors", {})
    image = images.get("hires")
    scale = float(factors.get("tissue_hires_scalef", 1.0))
    if image is None and "lowres" in images:
        image, scale = images["lowres"], float(factors.get("tissue_lowres_scalef", 1.0))
    diameter = float(factors.get("spot_diameter_fullres", 0.0))
    if diameter <= 0:
        d = cKDTree(xy).query(xy, k=2)[0][:, 1] if len(xy) > 1 else np.array([10.0])
        diameter = 0.55 * float(np.median(d))
    return SpatialView(None if image is None else np.asarray(image), scale, xy, diameter, str(library_id or ""))


def target_transform(adata: ad.AnnData) -> str:
    """The prediction's target transform, with the same default :func:`pair_with_measured` assumes."""
    return str(dict(adata.uns.get("he2st", {})).get("target_transform", "log1p_cp10k"))


def scale_label(adata: ad.AnnData) -> str:
    """The units of predicted (and paired measured) values, for colour bars and axes."""
    kind = target_transform(adata)
    return SCALES.get(kind, (kind, ""))[0]


def informative_genes(values: np.ndarray, names: list[str], n: int, also: np.ndarray | None = None) -> list[str]:
    """The ``n`` most variable genes among those expressed in at least 10% of spots (of ``also`` too, when
    given), then the others by variance. Variance alone favours genes that are zero almost everywhere and
    high in a few spots: their maps are empty (colour bar 0 to 1e-6)."""
    expressed = (values > EXPRESSED).mean(axis=0) >= MIN_EXPRESSED_FRACTION
    if also is not None:
        expressed &= (also > EXPRESSED).mean(axis=0) >= MIN_EXPRESSED_FRACTION
    order = np.lexsort((-np.nanvar(values, axis=0), ~expressed))  # expressed first, each group by variance
    return [names[i] for i in order[:n]]


def default_genes(adata: ad.AnnData, n: int = 6) -> list[str]:
    """The ``n`` genes to show first: the most predictable on a new patient when the model measured it
    (``var["expected_r"]``), among genes expressed in enough spots; else those whose predictions vary most
    across spots where they are expressed (informative maps)."""
    x = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float64)
    names = [str(g) for g in adata.var_names]
    if "expected_r" in adata.var:
        expected = np.nan_to_num(adata.var["expected_r"].to_numpy(dtype=np.float64), nan=-np.inf)
        expressed = (x > EXPRESSED).mean(axis=0) >= MIN_EXPRESSED_FRACTION
        return [names[i] for i in np.lexsort((-expected, ~expressed))[:n]]
    return informative_genes(x, names, n)


def _column(adata: ad.AnnData, gene: str) -> np.ndarray:
    if gene not in adata.var_names:
        raise He2stError(f"gene {gene!r} is not in the predictions ({adata.n_vars} genes)")
    col = adata[:, gene].X
    return np.asarray(col.toarray() if sp.issparse(col) else col, dtype=np.float64).ravel()


# ---------------------------------------------------------------------------- drawing
def _draw_background(ax, view: SpatialView, pad: float, max_px: int = 700) -> None:
    """The part of the H&E under the spots, reduced to what a panel can show (fast to render)."""
    h, w = view.image.shape[:2]
    if len(view.xy):
        lo = np.floor((view.xy.min(axis=0) - pad) * view.scale).astype(int)
        hi = np.ceil((view.xy.max(axis=0) + pad) * view.scale).astype(int)
        x0, y0 = max(lo[0], 0), max(lo[1], 0)
        x1, y1 = min(max(hi[0], x0 + 1), w), min(max(hi[1], y0 + 1), h)
    else:
        x0, y0, x1, y1 = 0, 0, w, h
    crop = np.ascontiguousarray(view.image[y0:y1, x0:x1, :3])
    if crop.size == 0:
        return
    factor = int(max(crop.shape[:2]) // max_px)
    if factor >= 2:
        crop = np.asarray(Image.fromarray(crop.astype(np.uint8)).reduce(factor))
    s = view.scale
    ax.imshow(crop, extent=(x0 / s, x1 / s, y1 / s, y0 / s), interpolation="bilinear")


def robust_limits(*arrays: np.ndarray) -> tuple[float, float] | None:
    """1st-99th percentile of the finite values of all ``arrays`` together: one outlier spot does not wash
    out a map, and maps drawn with the same limits can be compared colour for colour."""
    values = np.concatenate([np.ravel(a) for a in arrays])
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def draw_map(ax, view: SpatialView, values: np.ndarray, title: str = "", cmap: str = "viridis",
             colorbar: bool = True, label: str = "", clim: tuple[float, float] | None = None) -> None:
    """Spots as true-size discs coloured by ``values`` over the H&E (axes in level-0 px); the colour bar is
    titled ``label`` (the units) and spans ``clim`` (default: :func:`robust_limits` of ``values``)."""
    pad = view.diameter * 2
    if view.image is not None:
        _draw_background(ax, view, pad)
    finite = np.isfinite(values)
    discs = EllipseCollection(widths=view.diameter, heights=view.diameter, angles=0, units="xy",
                              offsets=view.xy[finite], offset_transform=ax.transData, cmap=cmap)
    discs.set_array(values[finite])
    clim = clim or robust_limits(values)
    if clim is not None:
        discs.set_clim(*clim)
    ax.add_collection(discs)
    if len(view.xy):
        ax.set_xlim(view.xy[:, 0].min() - pad, view.xy[:, 0].max() + pad)
        ax.set_ylim(view.xy[:, 1].max() + pad, view.xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if not finite.any():  # an empty map with a colour bar would read as a gene predicted flat
        title = f"{title} (no values)" if title else "no values"
    ax.set_title(title, fontsize=9, parse_math=False)  # a "$" in a gene name is a character, not TeX
    if colorbar and finite.any():
        bar = ax.figure.colorbar(discs, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(label, fontsize=8)


def _grid_figure(n: int, ncols: int, panel_in: float = 3.2) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(panel_in * ncols, panel_in * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def expression_maps(prediction: str | Path | ad.AnnData, genes: list[str] | None = None, n: int = 6,
                    ncols: int = 3) -> Figure:
    """Maps of predicted expression for ``genes`` (default: the ``n`` most variable) over the H&E."""
    adata = load_prediction(prediction)
    genes = genes or default_genes(adata, n)
    view = spatial_view(adata)
    fig, axes = _grid_figure(len(genes), ncols)
    for ax, gene in zip(axes, genes, strict=True):
        draw_map(ax, view, _column(adata, gene), f"{gene} (predicted)", label=scale_label(adata))
    return fig


def uncertainty_map(prediction: str | Path | ad.AnnData) -> Figure | None:
    """Retrieval uncertainty per spot (best match similarity, dispersion); None when the method has none."""
    adata = load_prediction(prediction)
    keys = [k for k in UNCERTAINTY_KEYS if k in adata.obs]
    if not keys:
        return None
    view = spatial_view(adata)
    fig, axes = _grid_figure(len(keys), len(keys), 4.0)
    notes = {"best_similarity": "best-match similarity\n(low = unfamiliar tissue)",
             "dispersion": "dispersion of retrieved profiles\n(high = ambiguous)",
             "ood_score": "out-of-distribution score\n(> 1: unlike every training patient)"}
    for ax, key in zip(axes, keys, strict=True):
        draw_map(ax, view, adata.obs[key].to_numpy(dtype=np.float64), notes[key], cmap="magma")
    return fig


# ---------------------------------------------------------------------------- measured comparison
@dataclass
class Paired:
    """Predicted and measured values at the same spots, on the model's target scale."""

    predicted: np.ndarray  # (n, g)
    measured: np.ndarray  # (n, g)
    genes: list[str]
    xy: np.ndarray  # (n, 2) measured spot centres (level-0 px)
    pearson: dict[str, float]
    matched_by: str  # "barcode" or "nearest spot"


def check_same_slide(meta: dict, sample: Sample) -> None:
    """Refuse to compare a prediction with a sample measured on another section: its spots would be matched
    "by nearest spot" and the correlations would be meaningless. The prediction records its slide (and, when
    predicted at a sample's spots, that sample); a slide at another path counts as the same only if the two
    files are byte-identical."""
    spots = str(meta.get("spots", ""))
    if spots.startswith("sample:") and spots != f"sample:{sample.sample_id}":
        raise He2stError(f"the prediction was made at the spots of {spots.removeprefix('sample:')}, "
                         f"not of sample {sample.sample_id}: compare it with that sample")
    slide = meta.get("slide")
    if not slide or sample.image_path is None:
        return  # nothing recorded to compare
    predicted, measured = Path(slide), Path(sample.image_path)
    if predicted.exists() and measured.exists():
        same = predicted.samefile(measured) or (predicted.stat().st_size == measured.stat().st_size
                                                and sha256_file(predicted) == sha256_file(measured))
    else:
        same = predicted.name == measured.name
    if not same:
        raise He2stError(f"sample {sample.sample_id} was measured on {measured}, but the prediction was made on "
                         f"{predicted}: not the same slide")


def pair_with_measured(prediction: str | Path | ad.AnnData, sample: Sample | str | Path,
                       genes: list[str] | None = None) -> Paired:
    """Align predictions with a sample's measured spots: by barcode, else by nearest spot centre.

    Nearest-spot matching (predictions on a hex grid) accepts pairs closer than one spot diameter.
    """
    adata = load_prediction(prediction)
    sample = Sample.load(sample) if isinstance(sample, str | Path) else sample
    meta = dict(adata.uns.get("he2st", {}))
    check_same_slide(meta, sample)
    kind = str(meta.get("target_transform", "log1p_cp10k"))
    wanted = [g for g in (genes or list(adata.var_names)) if g in set(sample.adata.var_names)]
    if not wanted:
        raise He2stError(f"none of the predicted genes is measured in sample {sample.sample_id}")
    measured_all = transform_counts(sample.adata.X, kind)  # library size from all measured genes
    columns = sample.adata.var_names.get_indexer(wanted)
    measured = np.asarray(measured_all[:, columns].toarray(), dtype=np.float64)
    pred_names = {str(b): i for i, b in enumerate(adata.obs_names)}
    meas_names = [str(b) for b in sample.adata.obs_names]
    shared = [i for i, b in enumerate(meas_names) if b in pred_names]
    if len(shared) >= max(1, len(meas_names) // 2):
        rows_m = np.array(shared)
        rows_p = np.array([pred_names[meas_names[i]] for i in shared])
        how = "barcode"
    else:
        view = spatial_view(adata)
        dist, nearest = cKDTree(view.xy).query(sample.spatial, k=1)
        ok = dist <= max(view.diameter, 1.0)
        rows_m, rows_p = np.flatnonzero(ok), nearest[ok]
        how = "nearest spot"
    if len(rows_m) < 3:
        raise He2stError(f"fewer than 3 predicted spots coincide with the measured spots of {sample.sample_id}")
    pred = np.column_stack([_column(adata, g)[rows_p] for g in wanted])
    meas = measured[rows_m]
    r = pearson_per_gene(pred, meas)
    return Paired(pred, meas, wanted, sample.spatial[rows_m], dict(zip(wanted, map(float, r), strict=True)), how)


def measured_defaults(adata: ad.AnnData, paired: Paired, n: int) -> list[str] | None:
    """The ``n`` measured genes to compare first when the model measured its own predictability
    (``var["expected_r"]``): the same ranking as the maps (:func:`default_genes`), so ``compare.png`` and
    ``scatter.png`` show the genes ``maps.png`` leads with rather than the most variable ones. None without
    ``expected_r`` (:func:`_pick` then ranks by variance of both predicted and measured values)."""
    if "expected_r" not in adata.var:
        return None
    return [g for g in default_genes(adata, adata.n_vars) if g in paired.pearson][:n] or None


def _pick(paired: Paired, genes: list[str] | None, n: int) -> list[str]:
    if genes:
        return [g for g in genes if g in paired.pearson]
    return informative_genes(paired.predicted, paired.genes, n, also=paired.measured)


def predicted_vs_measured(paired: Paired, view: SpatialView, genes: list[str] | None = None, n: int = 4,
                          scale: str = "") -> Figure:
    """Side-by-side maps (predicted | measured) per gene on one colour scale, titled with the gene's Pearson r.

    Both are on the model's target scale (``scale`` names it), so one colour scale per gene (1st-99th
    percentile of both together) is the honest view: a prediction shrunk towards the mean looks washed
    out next to the measurement instead of being stretched to look as contrasted. Z-scoring both would
    hide exactly that; it is only warranted for values on different scales, which these are not.
    """
    genes = _pick(paired, genes, n)
    fig = Figure(figsize=(6.4, 3.0 * len(genes)), layout="constrained")
    axes = fig.subplots(len(genes), 2, squeeze=False)
    at = SpatialView(view.image, view.scale, paired.xy, view.diameter, view.library_id)
    for row, gene in zip(axes, genes, strict=True):
        j = paired.genes.index(gene)
        clim = robust_limits(paired.predicted[:, j], paired.measured[:, j])
        draw_map(row[0], at, paired.predicted[:, j], f"{gene} predicted (r = {paired.pearson[gene]:.2f})",
                 label=scale, clim=clim)
        draw_map(row[1], at, paired.measured[:, j], f"{gene} measured", label=scale, clim=clim)
    return fig


def measured_scatter(paired: Paired, genes: list[str] | None = None, n: int = 6, ncols: int = 3,
                     scale: str = "") -> Figure:
    """Predicted vs measured per spot, one panel per gene, with Pearson r (axes in ``scale`` units)."""
    genes = _pick(paired, genes, n)
    fig, axes = _grid_figure(len(genes), ncols, 2.8)
    unit = f" ({scale})" if scale else ""
    for ax, gene in zip(axes, genes, strict=True):
        j = paired.genes.index(gene)
        ax.scatter(paired.measured[:, j], paired.predicted[:, j], s=6, alpha=0.6, linewidths=0)
        ax.set_title(f"{gene}: r = {paired.pearson[gene]:.2f}", fontsize=9, parse_math=False)
        ax.set_xlabel(f"measured{unit}", fontsize=8)
        ax.set_ylabel(f"predicted{unit}", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


def pearson_histogram(paired: Paired) -> Figure:
    """Per-gene Pearson r of predicted vs measured: the spread behind the mean (a few good genes or many)."""
    r = np.array(list(paired.pearson.values()), dtype=np.float64)
    fig = Figure(figsize=(5.0, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.hist(r[np.isfinite(r)], bins=np.linspace(-1, 1, 41), color="#4c72b0")
    if np.isfinite(r).any():
        ax.axvline(float(np.nanmean(r)), color="k", linestyle="--", linewidth=1, label="mean")
        ax.legend(fontsize=8)
    ax.axvline(0, color="#999", linewidth=0.8)
    ax.set_xlabel("per-gene Pearson r across spots (predicted vs measured)", fontsize=8)
    ax.set_ylabel("genes", fontsize=8)
    constant = int((~np.isfinite(r)).sum())
    ax.set_title(f"{len(r)} genes" + (f", {constant} constant (no r)" if constant else ""), fontsize=9)
    ax.tick_params(labelsize=7)
    return fig


def morans_i(values: np.ndarray, xy: np.ndarray, k: int = 6) -> np.ndarray:
    """Moran's I per column of ``values`` (spots x genes) with binary k-nearest-neighbour weights,
    row-standardised: how much each spot resembles its ``k`` nearest spots (0 = no spatial pattern,
    NaN for a constant gene). Predictions from overlapping image patches can be smoother than the
    tissue, which inflates spatially-variable-gene calls made on them."""
    n = len(xy)
    k = min(k, n - 1)
    idx = cKDTree(xy).query(xy, k=k + 1)[1]
    not_self = idx != np.arange(n)[:, None]  # self is usually first, but not for duplicated centres
    neighbours = np.take_along_axis(idx, np.argsort(~not_self, axis=1, kind="stable"), axis=1)[:, :k]
    weights = sp.csr_matrix((np.full(n * k, 1.0 / k), (np.repeat(np.arange(n), k), neighbours.ravel())),
                            shape=(n, n))  # row-standardised: a spot's lag is the mean of its neighbours
    z = values - values.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        moran = (z * (weights @ z)).sum(axis=0) / (z**2).sum(axis=0)
    return np.where(np.ptp(values, axis=0) > 0, moran, np.nan)


def training_curves(curves: dict[str, list[float]]) -> Figure:
    """Per-epoch curves (train/val loss, metrics), one panel per curve name."""
    names = [k for k, v in curves.items() if len(v) > 0]
    if not names:
        raise He2stError("no training curves to plot")
    fig, axes = _grid_figure(len(names), 3, 2.8)
    for ax, name in zip(axes, names, strict=True):
        ax.plot(np.arange(1, len(curves[name]) + 1), curves[name], marker="." if len(curves[name]) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


def learning_curve_figure(curve: pd.DataFrame, gene_set: str) -> Figure:
    """A benchmark's learning curve: each method's fold scores (points) and their mean (line) against the
    training data used, one panel per kind of amount (patients, shares of spots), each ending at all of it."""
    part = curve[curve["gene_set"] == gene_set]
    whole = np.isinf(part["amount_value"])  # the whole training data ends both kinds of curve
    masks = {"patients": part["amount_value"] >= 1, "spots": (part["amount_value"] < 1) | whole}
    kinds = [k for k, mask in masks.items() if (mask & ~whole).any()] or ["patients"]
    fig, axes = _grid_figure(len(kinds), len(kinds), 3.6)
    for ax, kind in zip(axes, kinds, strict=True):
        rows = part[masks[kind]]
        x = "n_train_patients" if kind == "patients" else "n_train_spots"
        for method, group in rows.groupby("method", sort=False):
            mean = group.groupby(x)["pearson_mean"].mean()
            line = ax.plot(mean.index, mean.to_numpy(), marker="o", label=method)[0]
            ax.scatter(group[x], group["pearson_mean"], s=10, alpha=0.4, color=line.get_color())
        ax.set_xlabel("training patients" if kind == "patients" else "training spots", fontsize=8)
        ax.set_ylabel(f"mean per-gene Pearson ({gene_set})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return fig


# ---------------------------------------------------------------------------- output
def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(figure_png(fig, dpi))
    return path


PREDICTION_FIGURES = ("maps.png", "uncertainty.png", "compare.png", "scatter.png", "pearson.png")


def check_prediction_figures(out_dir: str | Path) -> Path:
    """``out_dir`` when :func:`plot_prediction` may write its figures there, else one line naming the folder or
    a figure he2st did not write. Writes nothing, so ``he2st predict`` can refuse a foreign ``maps.png``
    before hours of prediction rather than after them."""
    out = check_folder(out_dir)
    for name in PREDICTION_FIGURES:
        check_output(out / name)
    return out


def plot_prediction(prediction: str | Path | ad.AnnData, out_dir: str | Path, genes: list[str] | None = None,
                    sample: Sample | str | Path | None = None, n: int = 6) -> dict[str, Path]:
    """Write ``maps.png`` (+ ``uncertainty.png``; with a measured sample ``compare.png``, ``scatter.png``,
    ``pearson.png``)."""
    adata = load_prediction(prediction)
    out = check_prediction_figures(out_dir)  # before any work: files he2st did not write are refused
    paired = None if sample is None else pair_with_measured(adata, sample)  # refused before anything is written
    paths = {"maps": save_figure(expression_maps(adata, genes, n), out / "maps.png")}
    unc = uncertainty_map(adata)
    if unc is not None:
        paths["uncertainty"] = save_figure(unc, out / "uncertainty.png")
    if paired is not None:
        view, scale = spatial_view(adata), scale_label(adata)
        shown = genes or measured_defaults(adata, paired, n)
        paths["compare"] = save_figure(predicted_vs_measured(paired, view, shown, min(n, 4), scale),
                                       out / "compare.png")
        paths["scatter"] = save_figure(measured_scatter(paired, shown, n, scale=scale), out / "scatter.png")
        paths["pearson"] = save_figure(pearson_histogram(paired), out / "pearson.png")
    return paths


def called_map(adata: ad.AnnData, path: str | Path, score: np.ndarray, called: np.ndarray, title: str,
               cmap: str, label: str) -> Path:
    """A per-spot score over the H&E with the called spots outlined, saved as ``path``."""
    view = spatial_view(adata)
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.subplots()
    draw_map(ax, view, np.asarray(score, dtype=float), title=title, cmap=cmap, label=label)
    ax.add_collection(EllipseCollection(widths=view.diameter, heights=view.diameter, angles=0, units="xy",
                                        offsets=view.xy[np.asarray(called, dtype=bool)], offset_transform=ax.transData,
                                        facecolors="none", edgecolors="black", linewidths=1.0))
    return save_figure(fig, path)


def draw_beside(output: Path, draw: Callable[[ad.AnnData, Path], Path], adata: ad.AnnData) -> Path:
    """``draw``'s map of ``adata`` as ``output`` with the suffix ``.png``, beside that output just written. When
    the map cannot be drawn the output goes too: calls without their map would pass for a finished result."""
    try:
        return draw(adata, output.with_suffix(".png"))
    except BaseException:
        output.unlink(missing_ok=True)
        raise


def draw_tls_map(adata: ad.AnnData, path: str | Path) -> Path:
    """The TLS score over the H&E, called spots outlined (``he2st tls``)."""
    return called_map(adata, path, adata.obs["tls_score"].to_numpy(float), adata.obs["tls_call"].to_numpy(bool),
                      "TLS score (called spots outlined)", "PuRd", "TLS score")


def draw_cancer_map(adata: ad.AnnData, path: str | Path) -> Path:
    """The cancer biomarker score over the H&E, called spots outlined (``he2st localize``)."""
    return called_map(adata, path, adata.obs["cancer_score"].to_numpy(float), adata.obs["cancer_call"].to_numpy(bool),
                      "cancer score (called spots outlined)", "YlOrRd", "cancer score (mean z)")
