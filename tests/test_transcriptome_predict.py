"""Genes beyond the panel: a retrieval model trained with ``transcriptome_threshold`` keeps a second bank
returning every well-expressed training gene, and ``he2st predict --genes``/``--transcriptome`` write them."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from synthetic import embedded_sections

from he2st.data.embeddings import EmbeddingFile
from he2st.data.patches import PatchSpec
from he2st.data.spots import SpotSet
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.methods import Method, load_method
from he2st.workflows.config import TrainRunConfig
from he2st.workflows.predict_slide import predict_slide
from he2st.workflows.train import train_model

PATIENTS = {"S1": "P1", "S2": "P2", "S3": "P3"}
GENE_NAMES = [f"G{i}" for i in range(30)]
GENES = {"n_genes": 10, "min_spot_fraction": 0.0}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return embedded_sections(tmp_path_factory.mktemp("tx"), PATIENTS, GENE_NAMES)


@pytest.fixture(scope="module")
def knn_model(small, tmp_path_factory):
    work, embed = small
    out = tmp_path_factory.mktemp("model") / "knn.pt"
    method, _, path = train_model(TrainRunConfig(
        work_dir=work, embed=embed, genes=GENES, n_top=5, method="knn", train_samples=["S2", "S3"], out=out,
        reliability=True, transcriptome_threshold=0.0))
    return method, path


def _s1_spots(work, embed, method) -> SpotSet:
    ws = Workspace(work)
    features = EmbeddingFile(ws.embedding_path(embed, "S1", PatchSpec())).embeddings
    n = len(features)
    return SpotSet(np.array(["S1"] * n, dtype=object), np.arange(n).astype(str).astype(object), features,
                   np.zeros((n, 2)), list(method.panel.genes))


def test_training_keeps_a_transcriptome_bank_beside_the_checkpoint(knn_model):
    method, path = knn_model
    bank = method.transcriptome_bank
    assert Method.transcriptome_path(path).exists() and bank is not None
    assert set(bank.genes) == set(GENE_NAMES) and len(bank) == len(method.bank)  # threshold 0: every gene
    tx = method.card.transcriptome
    assert tx["threshold"] == 0.0 and tx["n_genes"] == 30 and tx["beyond_panel"] == 20
    loaded = load_method(path)  # the checkpoint round trip attaches it
    assert loaded.transcriptome_bank.genes == bank.genes
    np.testing.assert_array_equal(loaded.transcriptome_bank.expression, bank.expression)
    assert any(field == "transcriptome" for field, _ in loaded.card.describe())


def test_predict_genes_beyond_the_panel_come_from_the_transcriptome_bank(small, knn_model, tmp_path):
    work, embed = small
    method, path = knn_model
    panel = list(method.panel.genes)
    other = next(g for g in GENE_NAMES if g not in panel)
    out = predict_slide(path, None, tmp_path / "p", spots_from=Workspace(work).sample_path("S1"), chunk=10,
                        weights=embed.weights, genes=f"{other},{panel[0]},{other}")
    adata = ad.read_h5ad(out)
    assert list(adata.var_names) == [other, panel[0]]  # a gene named twice is one column
    loaded = load_method(path)
    spots = _s1_spots(work, embed, loaded)
    direct = loaded.retrieve(spots, loaded.transcriptome_bank)
    np.testing.assert_allclose(adata.X[:, 0], direct.expression[:, direct.genes.index(other)], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adata.X[:, 1], loaded.predict(spots).expression[:, 0], rtol=1e-4, atol=1e-4)
    # intervals exist for panel genes only (NaN in the beyond-panel column); both carry an expected r, the
    # beyond-panel gene's measured by retrieving it from the inner folds' own transcriptome banks
    assert np.isnan(adata.layers["lower"][:, 0]).all() and np.isfinite(adata.layers["lower"][:, 1]).all()
    assert np.isfinite(adata.var["expected_r"]).all()
    assert set(method.reliability.genes) >= set(GENE_NAMES[:30]) - set(panel) | set(panel)

    whole = ad.read_h5ad(predict_slide(path, None, tmp_path / "w", spots_from=Workspace(work).sample_path("S1"),
                                       chunk=10, weights=embed.weights, transcriptome=True))
    assert list(whole.var_names[:10]) == panel and sorted(whole.var_names) == sorted(GENE_NAMES)
    np.testing.assert_allclose(whole[:, other].X.ravel(), adata.X[:, 0], rtol=1e-6)


def test_genes_the_model_cannot_return_are_refused_in_one_line(small, knn_model, tmp_path):
    work, embed = small
    method, path = knn_model
    s1 = Workspace(work).sample_path("S1")
    with pytest.raises(He2stError, match="NOPE are not in the model's panel .* nor its transcriptome bank") as err:
        predict_slide(path, None, tmp_path / "x", spots_from=s1, weights=embed.weights, genes="G0,NOPE")
    assert "\n" not in str(err.value)
    method.transcriptome_bank = None  # a model without one says how to get one
    other = next(g for g in GENE_NAMES if g not in method.panel.genes)
    with pytest.raises(He2stError, match="transcriptome_threshold=0.1") as err:
        predict_slide(method, None, tmp_path / "y", spots_from=s1, weights=embed.weights, genes=other)
    assert "\n" not in str(err.value) and other in str(err.value)
    with pytest.raises(He2stError, match="no transcriptome bank"):
        predict_slide(method, None, tmp_path / "z", spots_from=s1, weights=embed.weights, transcriptome=True)


def test_non_retrieval_methods_refuse_the_option_before_any_work(small, tmp_path):
    work, embed = small
    with pytest.raises(He2stError, match="method 'ridge' does not predict by retrieval") as err:
        train_model(TrainRunConfig(work_dir=work, embed=embed, genes=GENES, method="ridge", out=tmp_path / "r.pt",
                                   transcriptome_threshold=0.1))
    assert "\n" not in str(err.value) and not (tmp_path / "r.pt").exists()


def test_save_never_pairs_a_model_with_a_stale_transcriptome_bank(knn_model, tmp_path):
    method, path = knn_model
    copy = load_method(path)
    target = tmp_path / "m.pt"
    copy.save(target)
    assert Method.transcriptome_path(target).exists()
    copy.transcriptome_bank = None
    copy.save(target)
    assert not Method.transcriptome_path(target).exists() and load_method(target).transcriptome_bank is None


def test_cli_predict_transcriptome_flag(small, knn_model, tmp_path):
    import typer
    from typer.testing import CliRunner

    from he2st.cli_predict import register

    work, embed = small
    _, path = knn_model
    app = typer.Typer()
    register(app)
    args = ["predict", "--model", str(path), "--spots-from", str(Workspace(work).sample_path("S1")), "--weights",
            str(embed.weights), "--no-maps", "--out"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "a"), "--transcriptome"])
    assert res.exit_code == 0, res.output
    assert sorted(ad.read_h5ad(tmp_path / "a" / "S1.h5ad").var_names) == sorted(GENE_NAMES)
    res = CliRunner().invoke(app, [*args, str(tmp_path / "b"), "--transcriptome", "--genes", "G0"])
    assert res.exit_code != 0 and "not both" in str(res.exception) and "\n" not in str(res.exception)


def test_a_benchmark_builds_whole_transcriptome_targets_only_when_a_method_retrieves(small):
    """The whole-transcriptome targets are dense, training spots x every gene measured in all of them: about
    7 GB on 30 Visium sections of 18,000 genes, where her2st's 1,500 spots take 90 MB. Only retrieval methods
    are scored on them, so a run without one does not build them; one with a retrieval method still does."""
    from he2st.workflows.config import BenchmarkConfig
    from he2st.workflows.protocol import build_fold_data

    work, embed = small
    folds, patients = Workspace(work).load_folds("lopo")
    ridge = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=5, methods=["ridge"], tls=False)
    assert ridge.transcriptome_threshold is not None  # the default, kept: nothing here would read the targets
    assert build_fold_data(Workspace(work), folds[0], ridge, patients).transcriptome is None
    knn = ridge.model_copy(update={"methods": ["ridge", "knn"]})
    built = build_fold_data(Workspace(work), folds[0], knn, patients).transcriptome
    assert built is not None and built.train.shape == (50, len(GENE_NAMES))
