"""The HTML report and its figures on small synthetic predictions: units, shared colour scales, gene choice,
metric glossary, provenance, training data, per-gene r and spatial autocorrelation (Moran's I)."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import ndimage as ndi
from synthetic import spot_grid

from he2st.data.genes import GenePanel, transform_counts
from he2st.data.sample import Sample, spatial_library
from he2st.io import sha256_file
from he2st.methods import ModelCard
from he2st.report import html, plots
from he2st.version import __version__

SIDE = 12  # a SIDE x SIDE grid of spots
GENES = [f"G{i}" for i in range(6)]
WEIGHTS_SHA = "ab" * 32


def _prediction(values: np.ndarray, transform: str = "log1p_cp10k", trained_on: object = None) -> ad.AnnData:
    """A prediction laid out as ``he2st.predict.store.write_h5ad`` writes one (spots of sample S1)."""
    xy = spot_grid(SIDE, SIDE, 100.0, (200.0, 200.0))
    card = ModelCard(method="knn", panel=GenePanel(genes=GENES, transform=transform),
                     training_samples={"C2": "C", "B4": "B"}, weights_sha256=WEIGHTS_SHA)
    adata = ad.AnnData(X=values.astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=GENES))
    adata.obs["in_tissue"] = 1
    adata.obsm["spatial"] = xy
    thumb = np.full((160, 160, 3), 230, dtype=np.uint8)
    adata.uns["spatial"] = {"S1": spatial_library(thumb, 0.1, 55.0, "slide.tif", "he2st predict")}
    adata.uns["he2st"] = {"target_transform": transform, "method": "knn", "card": card.model_dump_json(),
                          "spots": "sample:S1", "pitch_um": 0.0,
                          "trained_on": dict(card.training_samples) if trained_on is None else trained_on}
    return adata


def _measured(seed: int = 0) -> tuple[Sample, np.ndarray]:
    """Sample S1 with spatially random counts, and its expression on the log1p CP10k scale."""
    counts = np.random.default_rng(seed).poisson(8, (SIDE * SIDE, len(GENES)))
    xy = spot_grid(SIDE, SIDE, 100.0, (200.0, 200.0))
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=GENES),
                       obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]))
    adata.obsm["spatial"] = xy
    sample = Sample("S1", "P9", adata, pixel_size_um=1.0, spot_diameter_um=55.0)
    return sample, transform_counts(counts, "log1p_cp10k").toarray()


def _smoothed(n_genes: int, seed: int = 1) -> np.ndarray:
    """Noise blurred over the grid: strongly autocorrelated, unrelated to the measurements."""
    noise = np.random.default_rng(seed).normal(2.0, 1.0, (SIDE, SIDE, n_genes))
    return ndi.uniform_filter(noise, size=(5, 5, 1), mode="nearest").reshape(SIDE * SIDE, n_genes)


# ---------------------------------------------------------------------------- figures
def test_colour_bars_name_the_expression_scale():
    _, truth = _measured()
    fig = plots.expression_maps(_prediction(truth), n=2)
    assert [a.get_ylabel() for a in fig.axes if a.get_ylabel()] == ["log1p CP10k"] * 2
    fig = plots.expression_maps(_prediction(np.log1p(truth), transform="log1p"), n=1)
    assert "log1p counts" in [a.get_ylabel() for a in fig.axes]


def test_predicted_and_measured_maps_share_one_robust_colour_scale():
    sample, truth = _measured()
    shrunk = truth.mean(axis=0) + 0.2 * (truth - truth.mean(axis=0))  # right pattern, too little contrast
    adata = _prediction(shrunk)
    paired = plots.pair_with_measured(adata, sample)
    fig = plots.predicted_vs_measured(paired, plots.spatial_view(adata), ["G1", "G2"], scale="log1p CP10k")
    maps = [a for a in fig.axes if a.get_title()]  # colour bars have no title
    assert len(maps) == 4
    for pred_ax, meas_ax, j in [(maps[0], maps[1], 1), (maps[2], maps[3], 2)]:
        both = np.concatenate([shrunk[:, j], truth[:, j]])
        expected = np.percentile(both, [1, 99])
        np.testing.assert_allclose(pred_ax.collections[0].get_clim(), expected, rtol=1e-4)
        np.testing.assert_allclose(meas_ax.collections[0].get_clim(), expected, rtol=1e-4)
        assert np.ptp(shrunk[:, j]) < 0.5 * np.ptp(expected)  # on its own scale it would look as contrasted
    assert [a.get_ylabel() for a in fig.axes if a.get_ylabel()] == ["log1p CP10k"] * 4


def test_gene_names_with_dollars_are_drawn_as_written():
    sample, truth = _measured()
    adata = _prediction(truth)
    adata.var_names = ["A$B$C", *GENES[1:]]  # mathtext would draw "ABC", B in italics
    sample.adata.var_names = ["A$B$C", *GENES[1:]]
    titled = [a.title for a in plots.expression_maps(adata, ["A$B$C"]).axes if a.get_title()]
    paired = plots.pair_with_measured(adata, sample)
    titled += [a.title for a in plots.measured_scatter(paired, ["A$B$C"]).axes if a.get_title()]
    titled += [a.title for a in plots.predicted_vs_measured(paired, plots.spatial_view(adata), ["A$B$C"]).axes
               if a.get_title()]
    assert len(titled) == 4 and all("A$B$C" in t.get_text() and not t.get_parse_math() for t in titled)


def test_a_gene_without_values_is_titled_so_and_has_no_colour_bar():
    """A gene with no value at any spot (beyond the panel, unmeasured) is an empty map: its title says so, and no
    colour bar suggests a scale it does not have."""
    _, truth = _measured()
    adata = _prediction(truth)
    adata.X = np.asarray(adata.X, dtype=np.float32)
    adata.X[:, 0] = np.nan
    figure = plots.expression_maps(adata, [GENES[0], GENES[1]])
    titles = [a.get_title() for a in figure.axes if a.get_title()]
    assert titles[0] == f"{GENES[0]} (predicted) (no values)" and "no values" not in titles[1]
    assert len(figure.axes) == 3  # two maps and the second one's colour bar


def test_default_genes_skip_genes_absent_from_most_spots():
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 0.3, (SIDE * SIDE, len(GENES)))
    values[:, 0] = 0.0
    values[:3, 0] = 50.0  # by far the largest variance, but an empty map
    values[:, 1] += rng.normal(0, 1.0, SIDE * SIDE)  # the most variable gene that is expressed
    genes = plots.default_genes(_prediction(values), 2)
    assert genes[0] == "G1" and "G0" not in genes
    assert plots.default_genes(_prediction(values), len(GENES))[-1] == "G0"  # kept, last, when asked for all


def test_plot_compares_the_most_predictable_genes_as_the_maps_do(tmp_path, monkeypatch):
    sample, truth = _measured()
    values = truth.copy()
    values[:, 5] *= 4.0  # by far the most variable, but the model expects little of it
    adata = _prediction(values)
    adata.var["expected_r"] = [0.1, 0.2, 0.3, 0.4, 0.9, 0.0]
    shown: list[list[str]] = []
    pick = plots._pick
    monkeypatch.setattr(plots, "_pick", lambda paired, genes, n: shown.append(pick(paired, genes, n)) or shown[-1])
    plots.plot_prediction(adata, tmp_path / "figs", sample=sample, n=2)
    assert plots.default_genes(adata, 2) == ["G4", "G3"]
    assert shown == [["G4", "G3"], ["G4", "G3"]]  # compare.png, scatter.png: the maps' genes, in their order


def test_morans_i_matches_the_definition():
    rng = np.random.default_rng(0)
    xy = spot_grid(SIDE, SIDE, 100.0, (0.0, 0.0)) + rng.uniform(-20, 20, (SIDE * SIDE, 2))  # no distance ties
    values = np.column_stack([xy[:, 0], rng.normal(size=len(xy)), np.full(len(xy), 0.3), _smoothed(1)[:, 0]])
    moran = plots.morans_i(values, xy, k=6)
    # brute force: W = binary 6-nearest-neighbour weights, row-standardised (S0 = n); I = z'Wz / z'z
    nn = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1:7]
    w = np.zeros((len(xy), len(xy)))
    np.put_along_axis(w, nn, 1 / 6, axis=1)
    z = values - values.mean(axis=0)
    with np.errstate(invalid="ignore"):
        brute = (z * (w @ z)).sum(axis=0) / (z**2).sum(axis=0)
    np.testing.assert_allclose(moran[[0, 1, 3]], brute[[0, 1, 3]], rtol=1e-10)
    assert moran[0] > 0.8 and abs(moran[1]) < 0.15 and moran[3] > 0.5
    assert np.isnan(moran[2])  # a constant gene has no spatial pattern to measure


# ---------------------------------------------------------------------------- the report
def test_report_with_weak_smooth_predictions_warns_and_states_units_and_provenance(tmp_path):
    sample, _ = _measured()
    pred_path = tmp_path / "pred.h5ad"
    _prediction(_smoothed(len(GENES))).write_h5ad(pred_path)
    sample_path = sample.save(tmp_path / "S1.h5ad")
    results = {"provenance": {"command": "he2st evaluate"}, "summary": [
        {"method": "knn", "gene_set": "heg50", "metric": "mse", "mean": 0.4, "sd": None, "n_folds": 1}]}
    page = html.build_report(pred_path, tmp_path / "r.html", sample=sample_path, results=results).read_text()
    # 1: no sd shown, none promised
    assert "0.400</td>" in page and "± sd" not in page and "mean over folds" in page
    # 2: glossary with units from the target transform
    assert "(log1p CP10k)² units" in page and "HEG-50" in page and "Spearman" in page and "MAE" in page
    # 6: provenance
    assert f"<td>{__version__}</td>" in page and re.search(r"<td>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00</td>", page)
    assert sha256_file(pred_path) in page and sha256_file(sample_path) in page and WEIGHTS_SHA in page
    # 7: training data in words, sorted by sample
    assert "B4 (patient B), C2 (patient C)" in page and "{" not in page.split("<body>")[1].split("<img")[0]
    # 8: per-gene r histogram and a caution box for weak predictions
    assert 'alt="per-gene Pearson r"' in page and "treat the maps as hypotheses" in page
    # 9: Moran's I side by side, and a warning because the predictions are much smoother
    assert "median Moran’s I" in page and "spatially smoother than the measurements" in page
    assert "spatially variable gene analysis" in page


def test_report_with_faithful_predictions_has_no_cautions(tmp_path):
    sample, truth = _measured()
    doc = {"summary": [{"method": "knn", "gene_set": "all", "metric": "pearson_mean", "mean": 0.3, "sd": 0.1}]}
    page = html.build_report(_prediction(truth), tmp_path / "r.html", sample=sample, results=doc).read_text()
    assert "0.300 ± 0.100" in page and "mean ± sd over folds" in page
    assert "Predicted vs measured (S1)" in page and f"{SIDE * SIDE} spots matched by barcode" in page
    assert "hypotheses" not in page and "spatially smoother" not in page
    assert "not computed (passed in memory" in page  # no file to checksum


@pytest.mark.parametrize("stored", [{"B4": "B", "C2": "C"}, json.dumps({"C2": "C", "B4": "B"})])
def test_trained_on_reads_a_mapping_or_its_older_json_string(stored):
    assert html.trained_on({"trained_on": stored}, None) == "B4 (patient B), C2 (patient C)"


def test_trained_on_falls_back_to_the_model_card():
    card = html.model_card(_prediction(np.ones((SIDE * SIDE, len(GENES)))))
    assert html.trained_on({}, card) == "B4 (patient B), C2 (patient C)"
    assert html.trained_on({}, None) is None
