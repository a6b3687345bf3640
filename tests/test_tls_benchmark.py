"""TLS detection in the benchmark: retrieval methods' TLS scores from predicted vs measured expression, the
ridge probe from image features (training spots only), and the ``tls`` table of a benchmark run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from synthetic import embedded_with_signature

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.tls import TlsModel
from he2st.evaluate.tls_benchmark import PROBE, build_tls_fold, method_tls_scores
from he2st.methods import create_method
from he2st.workflows.benchmark import run_benchmark, tls_report
from he2st.workflows.config import BenchmarkConfig

GENES = [f"G{i}" for i in range(30)]
MODEL = TlsModel(pd.Series([1.0, 0.8, 0.5, -0.3], index=["G0", "G1", "G2", "G3"]), intercept=0.1)


def _section(sid: str, counts: np.ndarray, features: np.ndarray, genes: list[str] = GENES):
    """A fake sample (its counts in an AnnData) and its training spots (panel = every gene, log1p CP10k)."""
    names = [f"{sid}_{i}" for i in range(len(counts))]
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=pd.DataFrame(index=names),
                       var=pd.DataFrame(index=genes))
    y = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    n = len(counts)
    rng = np.random.default_rng(len(sid))
    spots = SpotSet(np.full(n, sid, dtype=object), np.asarray(names, dtype=object), features.astype(np.float32),
                    rng.random((n, 2)) * 1000, list(genes), y)
    return SimpleNamespace(adata=adata), spots


def _tissue(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts whose TLS genes follow a lymphoid factor that the image features carry (plus noise)."""
    rng = np.random.default_rng(seed)
    lymphoid = rng.gamma(1.0, 1.0, n)
    features = np.c_[lymphoid, rng.normal(size=(n, 15))] + rng.normal(0, 0.1, (n, 16))
    rate = np.full((n, len(GENES)), 20.0)
    rate[:, :3] += 40 * lymphoid[:, None]
    return rng.poisson(rate).astype(np.float32), features


def test_a_test_sample_identical_to_a_training_one_is_retrieved_exactly_and_the_probe_learns():
    """knn with k=1 (one pooled top-k) on a test section that copies a training section (same counts, same features) gives the
    measured TLS score back (r = AUROC = 1): bank rows are matched to the right spots. The probe, fitted on the
    training patients only, recovers the score from the lymphoid feature on the held-out section."""
    samples, spots = {}, {}
    for sid, seed in (("A1", 0), ("B1", 1)):
        samples[sid], spots[sid] = _section(sid, *_tissue(120, seed))
    samples["C1"], test_truth = _section("C1", np.asarray(samples["A1"].adata.X.todense()), spots["A1"].features)
    train = SpotSet.concat([spots["A1"], spots["B1"]])
    test = test_truth.without_expression()
    knn = create_method("knn", top_k=1, per_sample=False)
    knn.panel = GenePanel(genes=GENES)
    knn.fit(train.subset(np.arange(len(train)) % 5 != 0), train.subset(np.arange(len(train)) % 5 == 0))
    fold = build_tls_fold(samples, train, test, {"A1": "A", "B1": "B", "C1": "C"}, MODEL)
    assert fold.info["genes_used"] == 4 and fold.info["probe_fitted_on"] == ["A1", "B1"]
    scores = method_tls_scores(knn, fold, train, test)
    assert scores["tls_pearson"] == pytest.approx(1.0) and scores["tls_auroc_top_decile"] == pytest.approx(1.0)
    assert fold.probe["tls_pearson"] > 0.8 and fold.probe["tls_auroc_top_decile"] > 0.8
    # the probe never reads test counts: other test counts change the truth, not the probe's fitted alpha
    samples["C1"].adata.X = sp.csr_matrix(np.random.default_rng(5).poisson(20, (120, len(GENES))).astype(np.float32))
    again = build_tls_fold(samples, train, test, {"A1": "A", "B1": "B", "C1": "C"}, MODEL)
    assert again.info["probe_alpha"] == fold.info["probe_alpha"] and again.probe["tls_pearson"] < 0.5


def test_a_fold_holding_little_of_the_model_s_weight_is_not_scored_and_says_why():
    """Another tissue's panel or another species' symbols may share a few names with the TLS model (her2st's
    breast signature on a mouse section: ``Cd74`` upper-cased is ``CD74``). A score read from under half of the
    model's weight is not the model's score: the fold is listed as not scored, with the coverage, not reported."""
    from he2st.evaluate.tls_benchmark import TlsReport

    model = TlsModel(pd.Series([1.0, 0.8, 0.5, -0.3, 3.0], index=["G0", "G1", "G2", "G3", "CXCL13"]))
    samples, spots = {}, {}
    for sid, seed in (("A1", 0), ("B1", 1), ("C1", 2)):
        samples[sid], spots[sid] = _section(sid, *_tissue(60, seed))
    train, test = SpotSet.concat([spots["A1"], spots["B1"]]), spots["C1"].without_expression()
    patients = {"A1": "A", "B1": "B", "C1": "C"}
    with pytest.raises(He2stError, match=r"measure 46% of the TLS model's weight \(4 of 5 genes\)"):
        build_tls_fold(samples, train, test, patients, model)
    report = TlsReport("mouse-free", model)
    assert report.fold("patient_C", samples, train, test, patients) is None
    assert "46%" in report.failures["patient_C"] and "not scored: patient_C" in report.markdown()
    assert build_tls_fold(samples, train, test, patients, MODEL).info["weight_coverage"] == 1.0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Three prepared and embedded synthetic sections of three patients, and a TLS signature on their genes."""
    return embedded_with_signature(tmp_path_factory.mktemp("tls_bench"), {"S1": "P0", "S2": "P1", "S3": "P2"}, GENES,
                                   "G0\t1.0\nG1\t0.5\nG7\t-0.2\nNOTMEASURED\t1.0\nintercept\t0.1\n")


def test_benchmark_writes_a_tls_table_for_retrieval_methods_and_the_probe(work):
    path, embed, signature = work
    cfg = BenchmarkConfig(work_dir=path, embed=embed, genes={"n_genes": 20, "min_spot_fraction": 0.0}, n_top=5,
                          name="tls", methods=["knn", "ridge"], method_options={"knn": {"top_k": 5}},
                          transcriptome_threshold=None, tls_model=str(signature),
                          reliability=True)  # knn's intervals are the panel's: its TLS genes are scored without them
    outcome = run_benchmark(cfg)
    assert "TLS detection" in outcome.table and PROBE in outcome.table
    tls = json.loads(outcome.paths["json"].read_text())["tls"]
    assert tls["failures"] == {} and tls["skipped"] is None
    rows = {(r["method"], r["score"]): r for r in tls["summary"]}
    assert {m for m, _ in rows} == {"knn", PROBE}  # ridge predicts the panel only: not a retrieval method
    assert rows[("knn", "tls_pearson")]["n_folds"] == 3 and np.isfinite(rows[("knn", "tls_pearson")]["mean"])
    folds, patients = Workspace(path).load_folds("lopo")
    for fold in folds:
        info = tls["folds"][fold.name]
        assert info["genes_used"] == 3 and info["weight_coverage"] == pytest.approx(1.7 / 2.7)
        assert not {patients[s] for s in info["probe_fitted_on"]} & {patients[s] for s in fold.test}
    assert "## TLS detection" in outcome.paths["markdown"].read_text()
    # a model that cannot be read skips TLS with the reason (the benchmark itself runs on); tls=false: no table
    missing = tls_report(cfg.model_copy(update={"tls_model": str(path / "none.tsv")}))
    assert missing.model is None and "not found" in missing.skipped and "TLS scores skipped" in missing.markdown()
    assert tls_report(cfg.model_copy(update={"tls": False})) is None


def test_a_sample_without_a_measured_tls_pattern_does_not_blank_its_fold():
    """A held-out sample whose measured score is constant has no r or AUROC; the fold's value is that of its
    other samples, not NaN."""
    from he2st.evaluate.tls_benchmark import _agreement

    rng = np.random.default_rng(0)
    truth = rng.normal(size=100)
    scores = _agreement({"S1": truth + rng.normal(0, 0.5, 100), "S2": rng.normal(size=50)},
                        {"S1": truth, "S2": np.zeros(50)})
    assert np.isfinite(scores["tls_pearson"]) and scores["tls_pearson"] > 0.5
    assert np.isfinite(scores["tls_auroc_top_decile"]) and scores["tls_auroc_top_decile"] > 0.5
