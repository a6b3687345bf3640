"""TLS scores: her2st's published model on measured sections, calls, regions and agreement."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from he2st.evaluate.tls import TlsModel, relative_abundance, tls_agreement, tls_regions, tls_score


def test_score_follows_the_published_preprocessing():
    """Relative abundance per spot, each gene divided by its std over the section, weighted sum + intercept;
    predictions on log1p CP10k give the same score as their counts."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(5, (50, 4)).astype(float)
    model = TlsModel(pd.Series([1.0, -0.5], index=["GA", "GC"]), intercept=0.25)
    got = tls_score(counts, ["ga", "gb", "gc", "gd"], model, "counts")
    rel = counts / counts.sum(1, keepdims=True)
    expected = rel[:, 0] / rel[:, 0].std() - 0.5 * rel[:, 2] / rel[:, 2].std() + 0.25
    np.testing.assert_allclose(got.score, expected)
    assert got.genes_used == 2 and got.weight_coverage == 1.0
    log = np.log1p(rel * 1e4)
    np.testing.assert_allclose(tls_score(log, ["GA", "GB", "GC", "GD"], model, "log1p_cp10k").score, expected)
    np.testing.assert_allclose(relative_abundance(log, "log1p_cp10k"), rel)


def test_regions_join_neighbouring_called_spots_only():
    xy = np.array([[0, 0], [1, 0], [2, 0], [10, 0], [11, 0], [20, 0]], dtype=float)
    score = np.array([5, 5, 0, 5, 5, 5.0])
    regions = tls_regions(score, xy, threshold=1.0, link=1.5)
    assert regions[2] == -1 and regions[0] == regions[1] and regions[3] == regions[4]
    assert len({regions[0], regions[3], regions[5]}) == 3


def test_agreement_is_perfect_for_the_same_score_and_chance_for_noise():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=500)
    same = tls_agreement(truth, truth)
    assert same["pearson"] == pytest.approx(1.0) and same["auroc_top_decile"] == pytest.approx(1.0)
    assert abs(tls_agreement(rng.normal(size=500), truth)["auroc_top_decile"] - 0.5) < 0.1


@pytest.mark.slow  # prepares the real her2st sections
def test_her2st_tls_cli_on_a_measured_section(prepared, tmp_path):
    """The published model on B4's measured counts: lymphoid genes drive the score (it follows the deconvolved
    B- and T-cell proportions), calls and regions are written, and a section compared with itself agrees."""
    import anndata as ad

    from in_process import run_cli

    sample = prepared / "samples" / "B4.h5ad"
    result = run_cli("tls", str(sample), "--signature", "her2st", "--sample", str(sample), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "against the measured sample: r 1.000, AUROC for its top-decile spots 1.000" in result.stdout
    out = ad.read_h5ad(tmp_path / "B4.tls.h5ad")
    info = out.uns["he2st_tls"]
    assert info["genes_used"] > 5000 and info["weight_coverage"] > 0.9 and info["n_called"] >= 0.09 * out.n_obs
    assert (tmp_path / "B4.tls.png").exists()
    lymphoid = out.obsm["celltype_major"][["B-cells", "T-cells"]].sum(axis=1).to_numpy()
    assert np.corrcoef(out.obs["tls_score"], lymphoid)[0, 1] > 0.3


def _prediction(path, genes, expected_r_low=None, scores=None):
    """A prediction file as `he2st predict` writes one (log1p CP10k values, spots on a grid); ``scores``: what
    its model's card says it measured of named signatures on held-out training patients."""
    import json

    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    var = pd.DataFrame(index=pd.Index(genes, name="gene"))
    if expected_r_low is not None:
        var["expected_r"] = var["expected_r_low"] = np.float32(expected_r_low)
    adata = ad.AnnData(X=rng.gamma(2.0, 0.5, size=(100, len(genes))).astype(np.float32), var=var)
    adata.obsm["spatial"] = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2) * 100.0
    adata.uns["he2st"] = {"target_transform": "log1p_cp10k"}
    if scores is not None:
        adata.uns["he2st"]["card"] = json.dumps({"reliability": {"scores": scores}})
    adata.write_h5ad(path)
    return path


CHEMOKINES = ["CCL2", "CCL3", "CCL4", "CCL5", "CCL8", "CCL18", "CCL19", "CCL21", "CXCL9", "CXCL10", "CXCL11", "CXCL13"]


def test_tls_calls_say_no_when_the_prediction_cannot_support_them(tmp_path):
    """A panel that lacks most of the signature, or a model that cannot predict its genes on a new patient,
    gets one line naming what is missing and what to do; --force calls anyway and keeps the reason."""
    from he2st.errors import He2stError
    from he2st.evaluate.tls import SIGNATURE_SOURCES
    from he2st.workflows.tls import detect_tls

    assert {"chemokine-12", "melanoma-cabrita", "her2st"} <= set(SIGNATURE_SOURCES)
    few = _prediction(tmp_path / "few.h5ad", ["CCL19", "CXCL13", "ERBB2", "ACTB"])
    with pytest.raises(He2stError, match=r"holds 17% of signature chemokine-12's weight \(2 of 12 genes"):
        detect_tls(few, tmp_path, "chemokine-12")
    weak = _prediction(tmp_path / "weak.h5ad", CHEMOKINES, expected_r_low=0.02)
    with pytest.raises(He2stError, match=r"not predictable enough on a new patient.*; or pass --force$"):
        detect_tls(weak, tmp_path, "chemokine-12")
    forced = detect_tls(weak, tmp_path, "chemokine-12", force=True)  # its caution no longer offers --force
    reason = forced.adata.uns["he2st_tls"]["refused_without_force"]
    assert "not predictable" in reason and "--force" not in reason
    good = detect_tls(_prediction(tmp_path / "good.h5ad", CHEMOKINES, expected_r_low=0.4), tmp_path, "chemokine-12")
    assert good.adata.uns["he2st_tls"]["refused_without_force"] == "" and good.adata.obs["tls_call"].sum() >= 10
    with pytest.raises(He2stError, match="unknown TLS signature 'chemokines'"):
        detect_tls(good.path, tmp_path, "chemokines")


def test_tls_calls_follow_what_the_model_measured_of_the_score_itself(tmp_path):
    """Where the model measured the signature's score on held-out training patients (same genes), that score's
    bound decides -- not its genes one by one -- and calls use the threshold set there, with its precision."""
    from he2st.errors import He2stError
    from he2st.workflows.tls import detect_tls

    measured = {"expected_r": 0.5, "expected_r_low": 0.3, "threshold": 20.0, "precision": 0.6, "recall": 0.5,
                "genes_used": 12}
    # weak genes one by one, a predictable score: calls, at the training threshold
    path = _prediction(tmp_path / "p.h5ad", CHEMOKINES, expected_r_low=0.02, scores={"chemokine-12": measured})
    result = detect_tls(path, tmp_path, "chemokine-12")
    info = result.adata.uns["he2st_tls"]
    assert info["refused_without_force"] == "" and info["threshold"] == 20.0
    assert "held-out training patients" in result.threshold_source and "precision 0.60" in result.threshold_source
    assert (result.adata.obs["tls_call"] == (result.adata.obs["tls_score"] >= 20.0)).all()
    # an unpredictable score is refused however good its genes look
    bad = _prediction(tmp_path / "b.h5ad", CHEMOKINES, expected_r_low=0.4,
                      scores={"chemokine-12": measured | {"expected_r_low": 0.05}})
    with pytest.raises(He2stError, match="chemokine-12's score is not predictable enough"):
        detect_tls(bad, tmp_path, "chemokine-12")
    # measured on other genes than the prediction holds: the genes' own bounds decide, the section's quantile calls
    other = _prediction(tmp_path / "o.h5ad", CHEMOKINES[:10], expected_r_low=0.4,
                        scores={"chemokine-12": measured | {"expected_r_low": 0.05}})
    assert "this section" in detect_tls(other, tmp_path, "chemokine-12").threshold_source
    # as many genes as the model measured, but other ones: not what it measured either
    swapped = measured | {"expected_r_low": 0.05, "genes": sorted([*CHEMOKINES[:11], "CD3E"])}
    same_count = _prediction(tmp_path / "s.h5ad", CHEMOKINES, expected_r_low=0.4, scores={"chemokine-12": swapped})
    assert "this section" in detect_tls(same_count, tmp_path, "chemokine-12").threshold_source


@pytest.mark.parametrize("command, drawer, written", [
    ("tls", "draw_tls_map", "good.tls.h5ad"), ("localize", "draw_cancer_map", "good.localize.csv")])
def test_calls_whose_map_cannot_be_drawn_are_not_left_behind(tmp_path, monkeypatch, command, drawer, written):
    """The map is drawn after the calls are written; when drawing fails, the calls go too (one error line), so
    no output passes for a finished result without its map."""
    from in_process import run_cli

    from he2st.errors import He2stError
    from he2st.report import plots

    path = _prediction(tmp_path / "good.h5ad", CHEMOKINES + ["EPCAM", "KRT8", "KRT18", "KRT19", "ERBB2"],
                       expected_r_low=0.4)

    def fails(adata, png):
        raise He2stError("cannot be written (no space left on device)", png)

    monkeypatch.setattr(plots, drawer, fails)
    args = ["--signature", "chemokine-12"] if command == "tls" else ["--force"]
    result = run_cli(command, path, "--out", tmp_path / "out", *args)
    assert result.returncode == 2 and "no space left on device" in result.stderr, result.stderr
    assert not (tmp_path / "out" / written).exists() and not (tmp_path / "out" / "good.png").exists()
    monkeypatch.undo()
    result = run_cli(command, path, "--out", tmp_path / "out", *args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / written).exists() and (tmp_path / "out" / written).with_suffix(".png").exists()
