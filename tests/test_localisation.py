"""Cancer localisation and default marker genes: the biomarker score, region labels, the benchmark's rows
(predicted vs measured vs image probe, labelled samples only) and ``he2st localize``."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from synthetic import embedded_sections

from he2st.data.sample import Sample
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.gene_sets import build_gene_sets
from he2st.evaluate.localisation import (
    SIGNATURE_SOURCES,
    cancer_labels,
    read_signature,
    separation,
    signature_score,
    youden_threshold,
)
from he2st.evaluate.markers import PAM50, fold_markers
from he2st.evaluate.tls import TlsModel

SIGNATURE = ["ERBB2", "GRB7", "PGAP3", "STARD3", "TCAP", "PNMT", "MIEN1", "EPCAM", "KRT8", "KRT18", "KRT19"]


def test_score_is_the_weighted_mean_of_within_section_z_scores():
    """Each signature gene z-scored over the section's spots, weighted, divided by the weights' total; a gene
    constant over the section adds nothing; the score reads gene names case-insensitively."""
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 1.0, (40, 4))
    values[:, 3] = 1.5
    model = TlsModel(pd.Series([2.0, 1.0, 1.0], index=["GA", "GB", "GD"]))
    got = signature_score(values, ["ga", "gb", "gc", "gd"], model)
    z = (values[:, :2] - values[:, :2].mean(0)) / values[:, :2].std(0)
    np.testing.assert_allclose(got.score, (2 * z[:, 0] + z[:, 1]) / 4)
    assert list(got.genes) == ["GA", "GB", "GD"] and got.weight_coverage == 1.0
    half = signature_score(sp.csr_matrix(values[:, :2]), ["GA", "GB"], model)
    np.testing.assert_allclose(half.score, (2 * z[:, 0] + z[:, 1]) / 3)
    assert half.weight_coverage == pytest.approx(0.75)
    with pytest.raises(He2stError, match="none of the localisation signature's genes"):
        signature_score(values, ["X1", "X2", "X3", "X4"], model)


def test_labels_follow_the_pathologist_regions():
    """Cancer: invasive cancer and cancer in situ; other labelled tissue: 0; undetermined, unlabelled and
    spots without a label: not scored. AUROC/AP come from sklearn; the Youden threshold splits a clean score."""
    obs = pd.DataFrame({"region": pd.Categorical(["invasive cancer", "Cancer in situ", "connective tissue",
                                                  "adipose tissue", "undetermined", "unlabelled", "immune infiltrate",
                                                  None, " "])}, index=[f"s{i}" for i in range(9)])
    labels = cancer_labels(obs, [*obs.index, "missing"])
    assert labels.tolist() == [1, 1, 0, 0, -1, -1, 0, -1, -1, -1]
    assert cancer_labels(pd.DataFrame(index=obs.index), obs.index) is None
    score = np.array([3.0, 2.0, 0.0, 1.0, 9.0, 9.0, -1.0, 9.0, 9.0, 9.0])
    assert separation(score, labels) == {"auroc": 1.0, "ap": 1.0, "cancer_share": 0.4}
    assert 1.0 < youden_threshold(score, labels) <= 2.0
    assert set(SIGNATURE_SOURCES) == {"breast-her2"}
    assert list(read_signature("breast-her2").weights.index) == SIGNATURE
    with pytest.raises(He2stError, match="unknown localisation signature 'lung'"):
        read_signature("lung")
    from he2st.workflows.config import BenchmarkConfig, load_config

    with pytest.raises(He2stError, match="localisation_signature.*unknown localisation signature 'lung'"):
        load_config(BenchmarkConfig, overrides=["localisation_signature=lung"])


def test_default_markers_are_the_datasets_list_within_the_panel_and_a_given_list_stays_strict():
    """her2st folds score PAM50's genes that are in the panel (the others dropped with a note); a list the user
    gives is passed on whole (the gene sets then refuse a missing gene); [] means no markers set; samples of
    another or of several datasets get none."""
    assert len(PAM50) == 50 == len(set(PAM50))
    panel = ["ERBB2", "ACTB", "GRB7", "KRT19"]
    markers, note = fold_markers(None, ["her2st", "her2st"], panel)
    assert markers == ["ERBB2", "GRB7"] and "2 of 50 genes in the fold's panel (ERBB2, GRB7)" in note
    assert "Parker et al. 2009" in note
    assert fold_markers(["KRT19", "ESR1"], ["her2st"], panel) == (["KRT19", "ESR1"], "")
    with pytest.raises(He2stError, match="1 marker gene.s. are not in the panel: ESR1"):
        build_gene_sets(np.ones((3, 4)), panel, markers=["KRT19", "ESR1"], n=2)
    assert fold_markers([], ["her2st"], panel)[0] is None
    assert fold_markers(None, [None], panel) == (None, "")
    assert fold_markers(None, ["her2st", None], panel) == (None, "")
    assert fold_markers(None, ["her2st"], ["ACTB"])[0] is None


GENES = [f"G{i}" for i in range(20)] + SIGNATURE[:4] + ["ESR1", "KRT19"]


@pytest.fixture(scope="module")
def labelled_work(tmp_path_factory):
    """Three embedded synthetic her2st-like sections of three patients; S1 and S2 carry region labels (cancer
    where the signature genes' gradient is high), S3 none. Expression rises along x, steepest for the last
    genes (the signature's), so the measured score separates cancer well."""
    root = tmp_path_factory.mktemp("localisation")
    work, embed = embedded_sections(root, {"S1": "P0", "S2": "P1", "S3": "P2"}, GENES)
    ws = Workspace(work)
    for sid in ("S1", "S2", "S3"):
        sample = ws.load_sample(sid)
        sample.dataset = "her2st"
        if sid != "S3":
            x = sample.spatial[:, 0]
            region = np.where(x > np.median(x), "invasive cancer", "connective tissue").astype(object)
            region[0] = "undetermined"
            sample.adata.obs["region"] = pd.Categorical(region)
        sample.save(ws.sample_path(sid))
    return work, embed


@pytest.mark.slow  # prepares, embeds and benchmarks three sections (about 20 s)
def test_benchmark_scores_localisation_on_labelled_held_out_samples_only(labelled_work):
    """Rows per method in summary.csv (gene set: the signature): predicted, measured (ceiling) and image probe
    (floor, fitted on training patients' labels only) AUROC/AP, on the two folds whose test sample is labelled;
    a results.md section; and PAM50's panel genes scored as the markers set by default."""
    from he2st.workflows.benchmark import run_benchmark
    from he2st.workflows.config import BenchmarkConfig

    work, embed = labelled_work
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes={"n_genes": 16, "min_spot_fraction": 0.0}, n_top=5,
                          name="loc", methods=["knn", "ridge"], transcriptome_threshold=None, tls=False,
                          reliability=False)
    outcome = run_benchmark(cfg)
    summary = pd.read_csv(outcome.paths["summary"])
    rows = summary[summary["gene_set"] == "breast-her2"]
    metrics = ["localisation_auroc", "localisation_ap", "localisation_auroc_measured", "localisation_ap_measured",
               "localisation_auroc_image", "localisation_ap_image", "localisation_cancer_share"]
    for method in ("knn", "ridge"):
        mine = rows[rows["method"] == method].set_index("metric")
        assert list(mine.index) == metrics
        assert (mine["n_folds"] == 2).all() and mine["fold_patient_P2"].isna().all()  # S3 carries no labels
    measured = rows[rows["metric"] == "localisation_auroc_measured"]["mean"]
    assert (measured > 0.7).all() and rows["mean"].between(0, 1).all()
    doc = json.loads(outcome.paths["json"].read_text())
    notes = {(f["method"], f["fold"]): f["notes"] for f in doc["folds"]}
    assert "S2" in notes[("knn", "patient_P0")]["localisation"] and "S1" not in notes[("knn", "patient_P0")]["localisation"]
    assert "localisation" not in notes[("knn", "patient_P2")]
    assert "PAM50" in notes[("knn", "patient_P0")]["markers"]
    markers = summary[(summary["gene_set"] == "markers") & (summary["metric"] == "pearson_mean")]
    assert len(markers) == 2  # PAM50 genes (ERBB2, GRB7, ESR1) are in every fold's panel
    text = outcome.paths["markdown"].read_text()
    assert "## cancer localisation" in text and "Signature `breast-her2`" in text
    assert "| breast-her2" not in text.split("## cancer localisation")[0]  # no signature column in set tables
    assert "Cancer localisation" in outcome.table


def _measured(path, n_side: int = 8, seed: int = 0) -> Sample:
    """A he2st sample whose right half is labelled invasive cancer and expresses the signature genes more."""
    rng = np.random.default_rng(seed)
    xy = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * 100.0
    cancer = xy[:, 0] >= n_side * 50
    genes = SIGNATURE + ["ACTB", "COL1A1"]
    rate = np.full((len(xy), len(genes)), 10.0)
    rate[:, : len(SIGNATURE)] += 30 * cancer[:, None]
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(rate).astype(np.float32)),
                       obs=pd.DataFrame(index=[f"{i}x{j}" for i, j in (xy / 100).astype(int)]),
                       var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    adata.obs["region"] = np.where(cancer, "invasive cancer", "connective tissue")
    sample = Sample(f"M{seed}", f"P{seed}", adata, pixel_size_um=1.0, spot_diameter_um=55.0, dataset="her2st")
    sample.save(path)
    return sample


def _predicted(path, measured: Sample, genes: list[str], expected_r_low: float | None = None):
    """A prediction at the measured sample's spots, as `he2st predict` writes one (log1p CP10k)."""
    from he2st.data.genes import transform_counts

    full = transform_counts(measured.adata.X, "log1p_cp10k").toarray()
    columns = [list(measured.adata.var_names).index(g) for g in genes]
    var = pd.DataFrame(index=pd.Index(genes, name="gene"))
    if expected_r_low is not None:
        var["expected_r"] = var["expected_r_low"] = np.float32(expected_r_low)
    adata = ad.AnnData(full[:, columns].astype(np.float32), obs=pd.DataFrame(index=measured.adata.obs_names), var=var)
    adata.obsm["spatial"] = measured.spatial
    adata.uns["he2st"] = {"target_transform": "log1p_cp10k"}
    adata.write_h5ad(path)
    return path


def test_localize_calls_cancer_spots_and_refuses_what_the_prediction_cannot_support(tmp_path):
    """A prediction of the whole signature is scored, called at the threshold its labelled training section
    gives (Youden's J), written as a table and a map, and agrees with the measured sample's labels; too few
    signature genes, or genes the model cannot predict on a new patient, are refused in one line (--force
    calls anyway, noted)."""
    from in_process import run_cli

    measured = _measured(tmp_path / "measured.h5ad")
    _measured(tmp_path / "train.h5ad", seed=1)
    good = _predicted(tmp_path / "good.h5ad", measured, SIGNATURE + ["ACTB"], expected_r_low=0.5)
    result = run_cli("localize", str(good), "--threshold-from", str(tmp_path / "train.h5ad"), "--sample",
                     str(tmp_path / "measured.h5ad"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "from 11 genes" in result.stdout and "region labels (Youden's J)" in result.stdout
    assert "against the measured sample: r 1.000, AUROC 1.000 and AP 1.000" in result.stdout
    table = pd.read_csv(tmp_path / "out" / "good.localize.csv")
    assert list(table.columns) == ["spot", "x", "y", "cancer_score", "cancer_call"]
    assert (table["cancer_call"] == (table["x"] >= 400)).all()
    assert (tmp_path / "out" / "good.localize.png").stat().st_size > 0

    few = _predicted(tmp_path / "few.h5ad", measured, ["ERBB2", "GRB7", "ACTB"])
    refused = run_cli("localize", str(few), "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "no cancer calls: the prediction holds 18% of signature breast-her2" in (
        refused.stderr)
    assert not (tmp_path / "out" / "few.localize.csv").exists()
    weak = _predicted(tmp_path / "weak.h5ad", measured, SIGNATURE, expected_r_low=0.01)
    refused = run_cli("localize", str(weak), "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "not predictable enough on a new patient" in refused.stderr
    forced = run_cli("localize", str(weak), "--out", str(tmp_path / "out"), "--force")
    assert forced.returncode == 0 and "caution (--force)" in forced.stdout
    assert "this section (0.5 quantile)" in forced.stdout
    # the model measured the signature's score on its held-out training patients: that decides, not its genes
    import json

    scored = ad.read_h5ad(weak)
    entry = {"expected_r": 0.6, "expected_r_low": 0.4, "threshold": 0.0, "precision": 0.5, "recall": 0.5,
             "genes_used": len(SIGNATURE)}
    scored.uns["he2st"] = {"target_transform": "log1p_cp10k",
                           "card": json.dumps({"reliability": {"scores": {"breast-her2": entry}}})}
    scored.write_h5ad(tmp_path / "measured_score.h5ad")
    assert run_cli("localize", str(tmp_path / "measured_score.h5ad"), "--out", str(tmp_path / "out")).returncode == 0


def test_named_scores_cover_tls_and_localisation_signatures():
    """What a fitted model measures on its inner folds: each named signature's per-spot score and the genes it
    used, None when the genes hold under half of its weight."""
    from he2st.workflows.named_scores import signature_scores

    scores = signature_scores("log1p_cp10k")
    assert {"chemokine-12", "melanoma-cabrita", "breast-her2"} <= set(scores)
    rng = np.random.default_rng(0)
    genes = SIGNATURE + ["ACTB"]
    values = rng.gamma(2.0, 0.5, size=(50, len(genes)))
    score, used = scores["breast-her2"](values, genes)
    assert score.shape == (50,) and sorted(used) == sorted(SIGNATURE)
    assert scores["breast-her2"](values[:, :2], genes[:2]) is None
    assert scores["chemokine-12"](values, genes) is None


@pytest.mark.slow  # prepares the real her2st sections
def test_her2st_a1_measured_cancer_score_separates_its_pathologist_labels(prepared, tmp_path):
    """The breast-her2 signature on A1's measured counts, compared with A1's own region labels (303 cancer of
    341 labelled spots): above chance, as on the other labelled her2st sections."""
    from in_process import run_cli

    sample = prepared / "samples" / "A1.h5ad"
    result = run_cli("localize", str(sample), "--sample", str(sample), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "from 11 genes" in result.stdout and "(89% of its labelled spots)" in result.stdout
    auroc = float(result.stdout.split("AUROC ")[1].split()[0])
    assert auroc > 0.6
    assert len(pd.read_csv(tmp_path / "A1.localize.csv")) == Sample.load(sample).n_spots


def test_her2st_labels_load_where_a_labelled_row_has_no_coordinates(her2st):
    """F1's label file holds an 'immune infiltrate' row without coordinates: it is skipped, the others load."""
    from he2st.data.her2st import load_section

    regions = load_section("F1", her2st, with_image=False).adata.obs["region"]
    assert regions.value_counts().to_dict() == {"invasive cancer": 577, "connective tissue": 56, "undetermined": 32,
                                                "immune infiltrate": 26}


def test_a_section_labelled_in_other_words_is_not_scored_and_the_note_says_which_words_count():
    """Region labels follow her2st's words (``invasive cancer``, ``cancer in situ``); another study's ``tumor``
    and ``stroma`` make every spot non-cancer, so the section cannot be scored. The fold's note names the
    words that count as cancer and the ones it found, so the cause is on the page rather than guessed."""
    from types import SimpleNamespace

    from he2st.data.spots import SpotSet
    from he2st.evaluate.localisation import build_localisation_fold

    rng = np.random.default_rng(0)
    genes = SIGNATURE[:4]
    barcodes = np.array([f"s{i}" for i in range(20)], dtype=object)
    obs = pd.DataFrame({"region": ["tumor"] * 10 + ["stroma"] * 10}, index=barcodes)
    samples = {"T": SimpleNamespace(adata=ad.AnnData(np.ones((20, 4), np.float32), obs=obs,
                                                     var=pd.DataFrame(index=genes)))}
    test = SpotSet(np.full(20, "T", dtype=object), barcodes, rng.normal(size=(20, 4)).astype(np.float32),
                   np.zeros((20, 2)), genes)
    fold = build_localisation_fold("breast-her2", read_signature("breast-her2"), samples, test, test,
                                   {"T": rng.gamma(2.0, 1.0, (20, 4))}, genes)
    assert not fold.labels
    assert ("not scored (no spots of both cancer, obs['region'] invasive cancer or cancer in situ, and other "
            "labelled tissue; labels found: stroma, tumor): T") in fold.note
