"""``he2st survival`` on a simulated cohort: the hazard depends on a known signature of predicted expression.

150 small prediction files (12 spots each, log1p CP10k scale). Each slide has a latent level s ~ N(0, 1):
SIG_UP rises and SIG_DOWN falls with s in every spot, the other genes are noise; the event time is
exponential with hazard 0.05 * exp(s), censoring uniform on 5..60. A model given the signature must find
the signal (C-index well above 0.5); the same slides with outcomes shuffled must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from in_process import run_cli
from sklearn.metrics import roc_auc_score

from he2st.errors import He2stError
from he2st.evaluate.survival import concordance, cross_validate, cumulative_dynamic_auc

GENES = ["SIG_UP", "SIG_DOWN", "CXCL13", "CCL19", "NOISE1", "NOISE2"]


def write_cohort(root: Path, n: int = 150, seed: int = 0) -> Path:
    """The prediction files, ``slides.csv`` with their outcomes and ``permuted.csv`` with them shuffled."""
    rng = np.random.default_rng(seed)
    (root / "pred").mkdir(parents=True, exist_ok=True)
    latent = rng.normal(size=n)
    time = rng.exponential(1 / (0.05 * np.exp(latent)))
    censor = rng.uniform(5, 60, n)
    event = (time <= censor).astype(int)
    time = np.minimum(time, censor)
    rows = []
    for i, s in enumerate(latent):
        spots = 12
        x = rng.normal(2.0, 0.5, (spots, len(GENES)))
        x[:, 0] = 2 + 0.6 * s + rng.normal(0, 0.3, spots)
        x[:, 1] = 2 - 0.6 * s + rng.normal(0, 0.3, spots)
        adata = ad.AnnData(X=np.clip(x, 0, None).astype(np.float32),
                           var=pd.DataFrame(index=GENES), obs=pd.DataFrame(index=[f"s{j}" for j in range(spots)]))
        adata.obsm["spatial"] = rng.uniform(0, 1000, (spots, 2))
        adata.uns["he2st"] = {"target_transform": "log1p_cp10k"}
        adata.write_h5ad(root / "pred" / f"slide{i}.h5ad")
        rows.append({"slide": f"slide{i}", "prediction": f"pred/slide{i}.h5ad"})
    table = pd.DataFrame(rows)
    for name, order in (("slides", np.arange(n)), ("permuted", rng.permutation(n))):
        table["time"], table["event"] = time[order].round(3), event[order]
        table.to_csv(root / f"{name}.csv", index=False)
    (root / "signature.csv").write_text("gene,weight\nSIG_UP,1\nSIG_DOWN,-1\n")
    (root / "tls.csv").write_text("gene,weight\nCXCL13,1\nCCL19,1\n")
    return root / "slides.csv"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort")).parent


def _run(root: Path, table: str) -> dict:
    out = root / f"out_{table}"
    result = run_cli("survival", "--slides", root / f"{table}.csv", "--out", out, "--horizon", "12",
                     "--signature", root / "signature.csv", "--genes", "NOISE1", "--tls", root / "tls.csv",
                     "--bootstrap", "200")
    assert result.returncode == 0, result.stderr
    assert "C-index" in result.stdout and "log-rank" in result.stdout
    for name in ("results.json", "risk.csv", "km.png"):
        assert (out / name).stat().st_size > 0
    risk = pd.read_csv(out / "risk.csv")
    assert len(risk) == 150 and set(risk["risk_group"]) == {"high", "low"}
    assert {"signature", "mean:NOISE1", "tls_density", "tls_mean"} <= set(risk.columns)
    return json.loads((out / "results.json").read_text())


def test_signal_recovered_and_permuted_cohort_is_null(cohort: Path) -> None:
    found = _run(cohort, "slides")
    assert found["cox_c_index"] > 0.65, found
    assert found["cox_c_index_ci"][0] > 0.55
    assert found["cox_c_index_ci"][0] <= found["cox_c_index"] <= found["cox_c_index_ci"][1]
    assert found["cox_auc"] > 0.65 and found["dfs_auc"] > 0.65 and found["dfs_c_index"] > 0.6
    assert found["logrank_p"] < 0.01
    coefficients = found["cox_coefficients"]  # the signature carries the hazard, the noise does not
    assert coefficients["signature"] > 0.3 and abs(coefficients["mean:NOISE1"]) < coefficients["signature"] / 2
    # the same slides with their outcomes shuffled (permuted.csv): no signal left to find
    features = pd.read_csv(cohort / "out_slides" / "risk.csv", index_col="slide")[list(found["features"])]
    permuted = pd.read_csv(cohort / "permuted.csv", index_col="slide").loc[features.index]
    null = cross_validate(features, permuted["time"].to_numpy(), permuted["event"].to_numpy(), 12.0, draws=200)
    assert abs(null.scores["cox_c_index"] - 0.5) < 0.08, null.scores
    assert null.scores["cox_c_index_ci"][0] < 0.5 < null.scores["cox_c_index_ci"][1]
    assert abs(null.scores["dfs_auc"] - 0.5) < 0.1


def test_auc_without_censoring_is_the_roc_auc_of_cases_against_controls() -> None:
    rng = np.random.default_rng(1)
    time, risk = rng.uniform(1, 20, 200), rng.normal(size=200)
    event = np.ones(200, dtype=int)
    at = 10.0
    cases, controls = time <= at, time > at
    expected = roc_auc_score(cases[cases | controls], risk[cases | controls])
    assert cumulative_dynamic_auc(time, event, risk, at) == pytest.approx(expected)
    assert concordance(time, event, -time) == pytest.approx(1.0)  # risk = earlier failure


def test_concordance_equals_lifelines_with_ties_and_censoring() -> None:
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(2)
    time = rng.integers(1, 15, 120).astype(float)  # many tied times
    event, risk = rng.integers(0, 2, 120), rng.integers(0, 5, 120).astype(float)  # and tied risks
    assert concordance(time, event, risk) == pytest.approx(concordance_index(time, -risk, event))


def test_auc_weights_cases_by_inverse_censoring_survival() -> None:
    """Two cases, one after a censoring: its weight is 1 / G(t-) = 3/2."""
    time = np.array([1.0, 2.0, 3.0, 10.0])
    event = np.array([1, 0, 1, 1])
    risk = np.array([0.9, 0.5, 0.1, 0.3])  # case at 1 outranks the control, the case at 3 does not
    auc = cumulative_dynamic_auc(time, event, risk, horizon=5.0)
    w1, w3 = 1.0, 1 / (2 / 3)  # at risk before t=2: 3 of them, one censored -> G = 2/3 after 2
    assert auc == pytest.approx(w1 / (w1 + w3))


@pytest.mark.parametrize(("content", "message"), [
    ("prediction,time\nx.h5ad,3\n", "lacks column(s) event"),
    ("prediction,time,event\nmissing.h5ad,3,1\n", "not found"),
    ("prediction,time,event\nmissing.h5ad,3,2\n", "event must be 0 or 1"),
    ("prediction,time,event\nmissing.h5ad,-1,1\n", "time must be a positive number"),
])
def test_bad_table_is_one_error_line(tmp_path: Path, content: str, message: str) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(content)
    result = run_cli("survival", "--slides", table, "--out", tmp_path / "out", "--horizon", "12", "--genes", "A")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_slides_of_one_patient_stay_in_one_fold_and_noise_stays_null() -> None:
    """Three near-identical slides per patient and outcomes unrelated to the features: with the patient named,
    no fold trains on a slide of a test patient, so the C-index stays near 0.5 (split by slide it reached
    0.68 on average over these seeds, the model recognising patients rather than outcomes)."""
    found = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        patients, k = 40, 3
        per_patient = rng.normal(size=(patients, 15))
        time, censor = rng.exponential(20, patients), rng.uniform(5, 40, patients)
        event, time = (time <= censor).astype(int), np.minimum(time, censor)
        x = np.repeat(per_patient, k, 0) + 0.05 * rng.normal(size=(patients * k, 15))
        groups = np.repeat([f"P{p}" for p in range(patients)], k)
        cv = cross_validate(pd.DataFrame(x, columns=[f"g{i}" for i in range(15)]), np.repeat(time, k),
                            np.repeat(event, k), 15.0, penalizer=0.01, draws=50, seed=seed, groups=groups)
        fold_of = pd.Series(cv.fold).groupby(groups).nunique()
        assert (fold_of == 1).all()
        found.append(cv.scores["cox_c_index"])
    assert abs(np.mean(found) - 0.5) < 0.08, found


def test_a_patient_with_two_outcomes_is_one_error_line(tmp_path: Path) -> None:
    for name in ("a", "b"):
        ad.AnnData(X=np.ones((3, 1), np.float32), var=pd.DataFrame(index=["A"])).write_h5ad(tmp_path / f"{name}.h5ad")
    table = tmp_path / "slides.csv"
    table.write_text("prediction,time,event,patient\na.h5ad,3,1,P1\nb.h5ad,5,1,P1\n")
    result = run_cli("survival", "--slides", table, "--out", tmp_path / "out", "--horizon", "12", "--genes", "A")
    assert result.returncode == 2 and "row 3: patient P1 has another time or event" in result.stderr, result.stderr


def test_slides_are_scored_on_the_signature_genes_they_all_hold(tmp_path: Path) -> None:
    """One slide lacks gene B of the signature: every slide is scored on A and C, so equal expression gives
    equal features (scored on their own genes, that slide's score fell by a third for lack of B)."""
    from he2st.evaluate.tls import TlsModel
    from he2st.workflows.survival import slide_features

    paths = []
    for i, genes in enumerate([["A", "B", "C"], ["A", "B", "C"], ["A", "C"]]):
        adata = ad.AnnData(X=np.full((5, len(genes)), 2.0, np.float32), var=pd.DataFrame(index=genes))
        adata.uns["he2st"] = {"target_transform": "log1p_cp10k"}
        adata.write_h5ad(tmp_path / f"s{i}.h5ad")
        paths.append(tmp_path / f"s{i}.h5ad")
    signature = TlsModel(pd.Series([1.0, 1.0, 1.0], index=["A", "B", "C"]))
    features, _ = slide_features(paths, signature=signature)
    assert np.allclose(features["signature"], 4.0), features
    with pytest.raises(He2stError, match="no gene of the signature is predicted in every slide"):
        slide_features(paths, signature=TlsModel(pd.Series([1.0], index=["B"])))


def test_a_feature_constant_on_the_slides_gets_no_weight() -> None:
    """TLS density 0 on every slide (a threshold no spot reaches) or on every training slide of a fold: the Cox
    model fits on the other features and gives it coefficient 0 (lifelines stopped on it with a NaN step)."""
    rng = np.random.default_rng(0)
    n = 60
    signal = rng.normal(size=n)
    time = np.minimum(rng.exponential(1 / (0.05 * np.exp(signal))), rng.uniform(5, 60, n))
    event = (rng.uniform(size=n) < 0.6).astype(int)
    rare = np.zeros(n)
    rare[np.flatnonzero(event)[:2]] = 0.3  # non-zero on two slides: absent from some folds' training slides
    features = pd.DataFrame({"signature": signal, "tls_density": np.zeros(n), "rare": rare})
    cv = cross_validate(features, time, event, 12.0, draws=20)
    assert cv.coefficients["tls_density"] == 0.0 and np.isfinite(cv.cox_risk).all()
    assert cv.scores["cox_c_index"] > 0.6
    with pytest.raises(He2stError, match="no feature varies across the slides"):
        cross_validate(features[["tls_density"]], time, event, 12.0, draws=20)


def test_the_tls_density_threshold_is_set_on_each_folds_training_slides() -> None:
    """Without --tls-threshold, a fold's TLS density is cut at the 0.9 quantile of its training slides' spot
    scores, never at one set with the slides it then scores; the refit on all slides uses all of them."""
    from he2st.workflows.survival import density_of

    rng = np.random.default_rng(1)
    n = 40
    scores = [rng.normal(loc=rng.normal(), size=50) for _ in range(n)]
    time = rng.uniform(1, 30, n)
    event = (rng.uniform(size=n) < 0.6).astype(int)
    features = pd.DataFrame({"tls_mean": [s.mean() for s in scores]})
    by_fold = density_of(scores, None)
    cv = cross_validate(features, time, event, 12.0, draws=10, fold_features=by_fold)
    for k, cut in enumerate(cv.fold_settings):
        train = np.flatnonzero(cv.fold != k)
        assert cut == pytest.approx(np.quantile(np.concatenate([scores[i] for i in train]), 0.9))
        held = np.flatnonzero(cv.fold == k)
        np.testing.assert_allclose(cv.fold_values["tls_density"].to_numpy()[held],
                                   [np.mean(scores[i] >= cut) for i in held])
    assert by_fold(np.arange(n))[1] == pytest.approx(np.quantile(np.concatenate(scores), 0.9))
    assert "tls_density" in cv.coefficients.index and len(set(cv.fold_settings)) == len(cv.fold_settings)


def test_a_tls_threshold_that_is_not_a_number_is_refused(cohort: Path, tmp_path: Path) -> None:
    result = run_cli("survival", "--slides", cohort / "slides.csv", "--out", tmp_path / "out", "--horizon", "12",
                     "--tls", cohort / "tls.csv", "--tls-threshold", "nan")
    assert result.returncode == 2 and "--tls-threshold must be a finite number, got nan" in result.stderr
    assert not (tmp_path / "out").exists()
