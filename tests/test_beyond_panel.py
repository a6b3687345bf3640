"""Scores beyond the panel (whole transcriptome, cell-type proportions), query-time neighbour context,
and the per-method ablation rows of the benchmark -- on small synthetic inputs."""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from he2st.data.genes import transform_counts
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.evaluate.beyond_panel import build_transcriptome, celltype_scores, transcriptome_scores
from he2st.evaluate.scoring import FoldResult, average_results, summarise_extra
from he2st.evaluate.tables import extra_markdown
from he2st.methods import list_methods, method_class
from he2st.methods.layers.neighbourhood import neighbour_context
from he2st.workflows.benchmark import ablation_variants


def _sample(sid: str, genes: list[str], n: int, rng: np.random.Generator, scale: np.ndarray):
    counts = rng.poisson(scale[None, : len(genes)], size=(n, len(genes))).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"{sid}_{i}" for i in range(n)]),
                       var=pd.DataFrame(index=genes))
    return SimpleNamespace(adata=adata)


def _spots(samples: dict, ids: list[str]) -> SpotSet:
    bc = np.concatenate([np.asarray(samples[s].adata.obs_names, dtype=object) for s in ids])
    sid = np.concatenate([np.full(samples[s].adata.n_obs, s, dtype=object) for s in ids])
    n = len(bc)
    return SpotSet(sid, bc, np.zeros((n, 2), np.float32), np.zeros((n, 2)), ["G0"])


def test_transcriptome_genes_and_threshold_come_from_training_samples_only():
    rng = np.random.default_rng(0)
    scale = np.array([50.0, 20.0, 5.0, 0.01, 0.0, 30.0])
    genes = [f"G{i}" for i in range(6)]
    samples = {
        "tr1": _sample("tr1", genes, 30, rng, scale),
        "tr2": _sample("tr2", genes[:5], 20, rng, scale),  # G5 missing in one training sample
        "te": _sample("te", ["G3", "G0", "G1", "G2", "G9"], 25, rng, scale[[3, 0, 1, 2, 0]]),
    }
    train = _spots(samples, ["tr1", "tr2"])
    tx = build_transcriptome(samples, ["tr1", "tr2"], ["te"], train, "log1p_cp10k", threshold=0.1)
    assert tx.genes == ["G0", "G1", "G2", "G3", "G4"]  # measured in every training sample, training order
    assert tx.scored == ["G0", "G1", "G2"]  # near-silent G3 / G4 are not scored
    assert tx.train.shape == (50, 5)
    expected = transform_counts(samples["tr1"].adata.X, "log1p_cp10k").toarray()[:, :5]
    np.testing.assert_allclose(tx.train[:30], expected, rtol=1e-6)
    test_expected = transform_counts(samples["te"].adata.X, "log1p_cp10k").toarray()[:, [1, 2, 3]]
    np.testing.assert_allclose(tx.truth["te"], test_expected, rtol=1e-6)
    # a perfect prediction of the scored genes scores 1; predictions come in bank gene order
    pred = np.zeros((25, 5), np.float32)
    pred[:, :3] = tx.truth["te"]
    scores = transcriptome_scores({"te": pred}, tx.genes, tx)
    assert scores["transcriptome_pearson_mean"] == pytest.approx(1.0)
    assert scores["transcriptome_genes_predicted"] == 5 and scores["transcriptome_genes_scored"] == 3
    with pytest.raises(He2stError, match="threshold"):
        build_transcriptome(samples, ["tr1", "tr2"], ["te"], train, "log1p_cp10k", threshold=100.0)


def test_celltype_scores_are_per_type_pearson_averaged_over_samples():
    rng = np.random.default_rng(1)
    truth = {s: rng.dirichlet(np.ones(3), size=40).astype(np.float32) for s in ("a", "b")}
    pred = {s: t.copy() for s, t in truth.items()}
    pred["b"][:, 2] = rng.random(40)  # type C is predicted at random on sample b
    scores = celltype_scores(pred, truth, ["A", "B", "C"])
    assert scores["celltype_pearson/A"] == pytest.approx(1.0) and scores["celltype_pearson/B"] == pytest.approx(1.0)
    assert scores["celltype_pearson/C"] < 0.8
    assert scores["celltype_pearson_mean"] == pytest.approx(np.mean([1, 1, scores["celltype_pearson/C"]]))


def test_extra_scores_are_averaged_over_seeds_and_summarised_over_folds():
    def result(fold: str, value: float) -> FoldResult:
        per_sample = {"s": {"all": {"pearson_mean": value}}}
        per_gene = pd.DataFrame({"sample": ["s"], "gene": ["G0"], "pearson": [value]})
        return FoldResult("carhe", fold, ["s"], per_sample, per_sample["s"], per_gene,
                          {"celltype_pearson_mean": value, "transcriptome_genes_scored": 8000.0})

    seeds = average_results([result("A", 0.2), result("A", 0.4)])
    assert seeds.extra["celltype_pearson_mean"] == pytest.approx(0.3)
    table = summarise_extra([seeds, result("B", 0.5)])
    row = table[table["score"] == "celltype_pearson_mean"].iloc[0]
    assert row["mean"] == pytest.approx(0.4) and row["n_folds"] == 2 and row["sd"] == pytest.approx(0.1414, abs=1e-3)
    markdown = extra_markdown(table)
    assert "0.400 ± 0.141" in markdown and " 8000 |" in markdown


def test_neighbour_context_averages_physical_neighbours_within_a_sample():
    coords = np.array([[0, 0], [100, 0], [200, 0], [0, 0], [5000, 0]], dtype=float)
    sids = np.array(["a", "a", "a", "b", "b"], dtype=object)
    emb = np.eye(5, dtype=np.float32) * 3.0
    out = neighbour_context(emb, coords, sids, k=1)
    np.testing.assert_allclose(out[0], (np.eye(5)[0] + np.eye(5)[1]) / 2)  # itself + nearest, normalised
    assert out[3, :3].sum() == 0  # never mixes in another sample's spots
    np.testing.assert_allclose(neighbour_context(emb, coords, sids, k=0), np.eye(5))


def test_every_ablation_names_real_options_of_its_method():
    for method in list_methods():
        rows = method_class(method).ablations
        fields = method_class(method).Config.model_fields
        for name, options in rows.items():
            assert set(options) <= set(fields), (method, name)
            method_class(method).Config(**options)
    labels = [label for label, _, _ in ablation_variants(["carhe", "ridge", "nh2st"])]
    assert labels[0] == "carhe-no_celltype_transfer" and "nh2st-no_neighbours" in labels
    assert not any(label.startswith("ridge") for label in labels)
    only = ablation_variants(["bleep", "carhe"], ["carhe", "bleep-single_model"])
    assert [label for label, _, _ in only][0] == "bleep-single_model" and len(only) == 1 + len(method_class("carhe").ablations)
    with pytest.raises(He2stError, match="nh2st-no_neighbours"):
        ablation_variants(["bleep"], ["nh2st-no_neighbours"])
