"""Tests for he2st.evaluate: metrics against scipy, honest gene sets, aggregation and output."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from he2st.errors import He2stError
from he2st.evaluate import gene_sets as gs
from he2st.evaluate.metrics import (
    evaluate_sample,
    gene_gene_correlation_preservation,
    mae_per_gene,
    mse_per_gene,
    pearson_per_gene,
    pearson_per_spot,
    spearman_per_gene,
)
from he2st.evaluate.results import write_results
from he2st.evaluate.scoring import FoldResult, average_results, evaluate_fold, summarise
from he2st.evaluate.tables import to_markdown
from he2st.io import MARKER


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _pair(rng: np.random.Generator, n_spots: int = 60, n_genes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    true = rng.normal(size=(n_spots, n_genes))
    pred = 0.6 * true + rng.normal(size=(n_spots, n_genes))
    return pred, true


def test_pearson_matches_scipy(rng):
    pred, true = _pair(rng)
    expected = [stats.pearsonr(pred[:, j], true[:, j])[0] for j in range(true.shape[1])]
    np.testing.assert_allclose(pearson_per_gene(pred, true), expected, rtol=1e-12, atol=1e-12)


def test_spearman_matches_scipy_with_ties(rng):
    true = rng.integers(0, 4, size=(50, 6)).astype(float)  # many ties
    pred = true + rng.integers(0, 3, size=(50, 6))
    expected = [stats.spearmanr(pred[:, j], true[:, j])[0] for j in range(6)]
    np.testing.assert_allclose(spearman_per_gene(pred, true), expected, rtol=1e-12, atol=1e-12)


def test_errors_and_per_spot(rng):
    pred, true = _pair(rng)
    np.testing.assert_allclose(mse_per_gene(pred, true), ((pred - true) ** 2).mean(axis=0))
    np.testing.assert_allclose(mae_per_gene(pred, true), np.abs(pred - true).mean(axis=0))
    expected = [stats.pearsonr(pred[i], true[i])[0] for i in range(true.shape[0])]
    np.testing.assert_allclose(pearson_per_spot(pred, true), expected, rtol=1e-12, atol=1e-12)


def test_constant_gene_is_nan_and_counted(rng):
    pred, true = _pair(rng, n_genes=5)
    pred[:, 1] = 0.1  # constant prediction (mean of 0.1s is not exactly 0.1 in floating point)
    true[:, 3] = 2.0  # constant truth
    r = pearson_per_gene(pred, true)
    assert np.isnan(r[[1, 3]]).all() and np.isfinite(r[[0, 2, 4]]).all()
    assert np.isnan(spearman_per_gene(pred, true)[[1, 3]]).all()

    genes = [f"g{j}" for j in range(5)]
    scores = evaluate_sample(pred, true, genes, {"all": genes, "pair": ["g0", "g1"]})
    assert scores.per_set["all"]["n_nan"] == 2
    assert scores.per_set["all"]["n_genes"] == 5
    assert scores.per_set["all"]["pearson_mean"] == pytest.approx(np.mean(r[[0, 2, 4]]))
    assert scores.per_set["pair"]["pearson_mean"] == pytest.approx(r[0])
    assert scores.per_set["all"]["mse"] == pytest.approx(mse_per_gene(pred, true).mean())
    assert list(scores.per_gene.columns) == ["gene", "pearson", "spearman", "mse", "mae"]
    assert math.isfinite(scores.gene_gene_corr)


def test_gene_gene_preservation(rng):
    latent = rng.normal(size=(200, 3))
    true = latent @ rng.normal(size=(3, 30)) + 0.5 * rng.normal(size=(200, 30))
    scale, shift = rng.uniform(0.5, 3.0, size=30), rng.normal(size=30)
    assert gene_gene_correlation_preservation(true * scale + shift, true) == pytest.approx(1.0)

    independent = rng.normal(size=true.shape)
    assert abs(gene_gene_correlation_preservation(independent, true)) < 0.15

    collapsed = true.copy()
    collapsed[:, 0] = 1.0  # a constant gene is left out, not turned into NaN for the whole panel
    assert gene_gene_correlation_preservation(collapsed, true) == pytest.approx(1.0)
    assert math.isnan(gene_gene_correlation_preservation(true[:, :2], true[:, :2]))


def test_gene_gene_preservation_is_nan_when_all_predicted_genes_share_one_pattern(rng):
    # every predicted gene a positive rescaling of one pattern: all predicted pairs correlate at 1, so there is
    # no structure to compare, and round-off must not be scored as if there were
    pattern = rng.normal(size=200)
    pred = np.column_stack([pattern * s + o for s, o in zip(rng.uniform(0.5, 3, 20), rng.uniform(0, 5, 20))])
    assert math.isnan(gene_gene_correlation_preservation(pred, rng.normal(size=(200, 20))))


def test_missing_gene_in_set_raises(rng):
    pred, true = _pair(rng, n_genes=3)
    with pytest.raises(He2stError, match="NOPE"):
        evaluate_sample(pred, true, ["a", "b", "c"], {"markers": ["a", "NOPE"]})
    with pytest.raises(He2stError, match="NOPE"):
        gs.build_gene_sets(true, ["a", "b", "c"], markers=["NOPE"], n=2)


def test_train_selected_sets_differ_from_test_selected(rng):
    genes = [f"g{j:02d}" for j in range(20)]
    train = rng.normal(size=(100, 20))
    test = rng.normal(size=(40, 20))
    train[:, :5] += 10.0  # high mean in training only
    test[:, 10:15] += 10.0  # high mean in the test sample only
    train[:, 5:10] *= 5.0  # variable in training only
    test[:, 15:] *= 5.0  # variable in the test sample only

    sets = gs.build_gene_sets(train, genes, markers=["g03", "g01", "g03"], n=5)
    assert list(sets) == ["all", "heg5", "hvg5", "markers"]
    assert set(sets["heg5"]) == set(genes[:5]) and set(sets["hvg5"]) == set(genes[5:10])
    assert sets["markers"] == ["g03", "g01"]

    leaky = gs.test_sample_gene_sets(test, genes, n=5)
    assert set(leaky["heg5_testselected"]) == set(genes[10:15])
    assert set(leaky["hvg5_testselected"]) == set(genes[15:])
    assert "test sample" in gs.test_sample_gene_sets.__doc__


def test_ties_broken_by_gene_name():
    expr = np.array([[1.0, 2.0, 2.0, 2.0], [1.0, 2.0, 2.0, 2.0]])
    assert gs.top_expressed(expr, ["d", "c", "a", "b"], n=2) == ["a", "b"]
    assert gs.top_variable(expr, ["d", "c", "a", "b"], n=2) == ["a", "b"]


def _fold(method: str, fold: int, sample_values: dict[str, float]) -> FoldResult:
    per_sample = {s: {"all": {"pearson_mean": v}} for s, v in sample_values.items()}
    return FoldResult(method, fold, list(sample_values), per_sample, {}, pd.DataFrame())


def test_summarise_mean_sd_over_three_folds():
    folds = [
        _fold("m", 0, {"a": 0.2, "b": 0.4}),  # fold score 0.3 (mean over samples)
        _fold("m", 1, {"c": 0.5}),
        _fold("m", 2, {"d": 0.1}),
        _fold("solo", 0, {"a": 0.7}),
    ]
    df = summarise(folds)
    row = df[(df.method == "m") & (df.gene_set == "all") & (df.metric == "pearson_mean")].iloc[0]
    assert row["mean"] == pytest.approx(0.3)
    assert row["sd"] == pytest.approx(math.sqrt((0.0**2 + 0.2**2 + 0.2**2) / 2))
    assert row["n_folds"] == 3
    assert [row["fold_0"], row["fold_1"], row["fold_2"]] == pytest.approx([0.3, 0.5, 0.1])
    solo = df[df.method == "solo"].iloc[0]
    assert solo["n_folds"] == 1 and math.isnan(solo["sd"]) and math.isnan(solo["fold_1"])

    md = to_markdown(df, sets=("all", "heg50"))
    assert "0.300 ± 0.200" in md and "0.700" in md and "n/a" in md
    assert md.splitlines()[0].startswith("| method")


def test_seed_average_keeps_a_gene_that_one_seed_predicted_constant_nan(rng):
    # per_gene.csv must agree with the set means: a gene NaN in one seed is NaN in the average, as
    # pearson_mean (averaged over seeds with the NaN kept) and n_nan (0.5) say.
    truth = rng.normal(size=(30, 4))
    genes = ["a", "b", "c", "d"]
    pred = truth + rng.normal(size=truth.shape)
    constant = pred.copy()
    constant[:, 0] = 1.0
    runs = [evaluate_fold("m", 0, {"s": p}, {"s": truth}, genes, {"all": genes}) for p in (pred, constant)]
    seeds = average_results(runs)
    assert math.isnan(seeds.per_gene.loc[seeds.per_gene["gene"] == "a", "pearson"].iloc[0])
    np.testing.assert_allclose(seeds.per_gene["mse"], (runs[0].per_gene["mse"] + runs[1].per_gene["mse"]) / 2)
    assert seeds.per_sample["s"]["all"]["n_nan"] == 0.5
    assert list(seeds.per_gene.columns) == list(runs[0].per_gene.columns)


def test_write_results_valid_json_and_no_temp_files(rng, tmp_path):
    genes = ["a", "b", "c", "d"]
    trues = {"s1": rng.normal(size=(30, 4)), "s2": rng.normal(size=(25, 4))}
    preds = {s: t + rng.normal(size=t.shape) for s, t in trues.items()}
    preds["s1"][:, 2] = 0.0  # constant prediction -> NaN pearson in s1
    sets = {"all": genes, "heg2": ["a", "b"]}
    leaky = {s: gs.test_sample_gene_sets(t, genes, n=2) for s, t in trues.items()}
    folds = [evaluate_fold("ridge", k, preds, trues, genes, sets, per_sample_sets=leaky) for k in (0, 1)]
    assert set(folds[0].pooled) == {"all", "heg2"}
    assert "heg2_testselected" in folds[0].per_sample["s1"]

    provenance = {"command": "he2st evaluate", "version": "0.1.0", "weird": float("nan")}
    paths = write_results(tmp_path / "out", folds, provenance)

    def refuse(token: str) -> None:
        raise AssertionError(f"invalid JSON constant {token}")

    doc = json.loads(paths["json"].read_text(encoding="utf-8"), parse_constant=refuse)
    assert doc["provenance"]["weird"] is None
    per_gene = doc["folds"][0]["per_gene"]
    assert None in per_gene["pearson"]  # the NaN gene is null, not dropped
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != MARKER) == [
        "per_gene.csv",
        "results.json",
        "results.md",
        "summary.csv",
    ]
    table = pd.read_csv(paths["per_gene"])
    assert list(table.columns[:4]) == ["method", "fold", "sample", "gene"]
    assert len(table) == 2 * (len(genes) * 2)
    assert "±" in paths["markdown"].read_text(encoding="utf-8")
    assert set(pd.read_csv(paths["summary"])["gene_set"]) >= {"all", "heg2", "heg2_testselected"}


def test_mean_sample_pearson_scores_patterns_within_samples_not_level_shifts(rng):
    """Inner selections score what the benchmark scores: a prediction that gets each section's level right
    but each within-section pattern backwards correlates highly when pooled, and negatively per sample."""
    from he2st.stats import mean_sample_pearson, pearson_per_gene

    truth = rng.normal(size=(200, 5))
    samples = np.repeat(["s1", "s2"], 100)
    truth[samples == "s2"] += 10.0  # section s2 is higher in every gene
    pred = -truth.copy()
    pred[samples == "s1"] -= 10.0  # levels right way round (s2 above s1), patterns reversed
    pred[samples == "s2"] += 30.0
    assert np.nanmean(pearson_per_gene(pred, truth)) > 0.9
    assert mean_sample_pearson(pred, truth, samples) == pytest.approx(-1.0)
    assert mean_sample_pearson(truth, truth, samples) == pytest.approx(1.0)


def test_one_standard_error_rule_keeps_the_default_unless_the_evidence_is_clear():
    """Options chosen on a few noisy inner folds: the best mean replaces the default only when it is ahead
    by more than a standard error of the paired differences (with two folds: ahead in both)."""
    from he2st.stats import one_standard_error_choice

    assert one_standard_error_choice({"off": [0.10, 0.20], "on": [0.11, 0.21]}, "off") == "on"  # ahead in both
    assert one_standard_error_choice({"off": [0.10, 0.20], "on": [0.30, 0.19]}, "off") == "off"  # a lucky fold
    assert one_standard_error_choice({"off": [0.3, 0.3, 0.3], "on": [0.5, 0.5, 0.1]}, "off") == "off"
    assert one_standard_error_choice({"off": [0.3, 0.3, 0.3, 0.3], "on": [0.5, 0.5, 0.4, 0.29]}, "off") == "on"
    assert one_standard_error_choice({"off": [0.1], "on": [0.9]}, "off") == "off"  # one fold: no error to judge by
    assert one_standard_error_choice({"off": [0.1, 0.1], "on": [0.2, 0.2], "half": [0.15, 0.15]}, "half") == "on"
