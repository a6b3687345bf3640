"""The whole pipeline on a tiny synthetic work folder, quick enough for the fast test loop:
prepare -> embed -> train -> evaluate -> benchmark, through the Python API and the CLI, with the
resume and no-leakage checks that test_protocol.py runs on real her2st (marked slow there).

Three legacy-ST sections of three patients (25 spots, 60 genes each), embedded by a tiny random ViT.
Panels have 50 genes because ``evaluate_model`` scores test-selected sets of 50 genes.
"""

from __future__ import annotations

import json
import shutil

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from synthetic import embedded_sections
from typer.testing import CliRunner

from he2st.data.embeddings import EmbeddingFile
from he2st.data.genes import GeneConfig, GenePanel
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.spots import load_spots
from he2st.data.workspace import Workspace
from he2st.encoders import create
from he2st.encoders.inference import load_encoder
from he2st.errors import He2stError
from he2st.io import record_output
from he2st.methods import list_methods, load_method
from he2st.workflows.benchmark import run_benchmark
from he2st.workflows.config import BenchmarkConfig, TrainRunConfig
from he2st.workflows.embed import embed_cache, embed_workspace, finished, recipe
from he2st.workflows.evaluate import evaluate_model
from he2st.workflows.protocol import build_fold_data, run_fold
from he2st.workflows.train import train_model

PATIENTS = {"S1": "P1", "S2": "P2", "S3": "P3"}
GENE_NAMES = [f"G{i}" for i in range(60)]
GENES = {"n_genes": 50, "min_spot_fraction": 0.0}
N_TOP = 5
TINY_TRAIN = {"epochs": 2, "batch_size": 16, "patience": 2}
# every method, small enough to fit in well under a second on the 50 training spots of a fold
TINY = {
    "bleep": {"ensemble": 1, "train": TINY_TRAIN},
    "bleep_faithful": {"top_k": 5, "train": TINY_TRAIN},
    "mlp": {"train": TINY_TRAIN},
    "ridge": {"pca_components": 8},
    "ridge_cv": {"pca_components": 8},
    "knn": {"top_k": 5},
    "cmrcnet": {"projection_dim": 16, "mlp_hidden": [16], "attention_dim": 16, "expression_token_hidden": 16,
                "cross_heads": 2, "fusion_heads": 2, "fusion_depth": 1, "top_k": 5, "train": TINY_TRAIN},
    "nh2st": {"dim": 16, "fusion_heads": 2, "head_hidden": 16, "neighbour_k": 4, "train": TINY_TRAIN},
    "cmrcnet_faithful": {"projection_dim": 16, "attention_dim": 16, "cross_heads": 2, "fusion_heads": 2,
                         "fusion_depth": 1, "top_k": 5, "train": TINY_TRAIN},
    "nh2st_faithful": {"dim": 16, "fusion_heads": 2, "head_hidden": 16, "neighbour_k": 4, "train": TINY_TRAIN},
    "carhe": {"projection_dim": 16, "mlp_hidden": [16], "celltype_transfer": False, "histology_pretrain_epochs": 1,
              "histology_neighbours": 4, "top_k": 5, "train": TINY_TRAIN},
    "ensemble": {"members": {"knn": {"method": "knn", "top_k": 5}, "ridge": {"method": "ridge", "pca_components": 8},
                             "bleep": {"method": "bleep", "ensemble": 1, "train": TINY_TRAIN}}},
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """``(work dir, embed config)`` of three prepared and embedded synthetic sections."""
    return embedded_sections(tmp_path_factory.mktemp("small"), PATIENTS, GENE_NAMES)


def test_prepared_and_embedded_once_and_rerun_is_noop(small):
    work, embed = small
    ws = Workspace(work)
    assert ws.sample_ids() == sorted(PATIENTS)
    folds, patients = ws.load_folds("lopo")
    assert patients == PATIENTS and sorted(f.name for f in folds) == ["patient_P1", "patient_P2", "patient_P3"]
    for fold in folds:
        panel = GenePanel.from_config({s: ws.load_sample(s).adata for s in fold.train}, GeneConfig(**GENES))
        assert panel.fitted_on == sorted(fold.train) and panel.n_genes == 50
    for sid in PATIENTS:
        f = EmbeddingFile(ws.embedding_path(embed, sid, PatchSpec()))
        assert f.barcodes == list(ws.load_sample(sid).adata.obs_names) and len(f.barcodes) == 25
        assert f.encoder_spec["name"] == "test_vit" and np.isfinite(f.embeddings).all()
    again = embed_workspace(ws, sorted(PATIENTS), PatchSpec(), embed)
    assert again.n_embedded == 0


def test_weights_rewritten_at_the_same_path_are_embedded_again(small, tmp_path):
    """The spec records the weights file's path; new weights saved under that path must not reuse the old
    embeddings."""
    work, embed = small
    ws = Workspace(work)
    weights = tmp_path / "weights.pth"
    shutil.copy(embed.weights, weights)
    config = embed.model_copy(update={"weights": weights})
    made = embed_workspace(ws, ["S1"], PatchSpec(), config)
    first = EmbeddingFile(made.paths["S1"]).embeddings
    torch.manual_seed(1)
    torch.save(create("test_vit", pretrained=False).backbone.state_dict(), weights)
    again = embed_workspace(ws, ["S1"], PatchSpec(), config)
    assert again.n_embedded == made.n_embedded > 0  # the spots and their context field, all again
    fresh = load_encoder(config)
    patches = PatchCache(ws.patch_path("S1", PatchSpec())).read()
    with torch.inference_mode():
        expected = fresh(fresh.preprocess(patches)).numpy()
    got = EmbeddingFile(again.paths["S1"]).embeddings
    assert not np.allclose(got, first)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_auto_precision_on_a_gpu_is_not_taken_for_the_fp32_of_a_cpu(small):
    """``precision=auto`` is fp32 on a CPU and bf16 on a GPU: a file made on one is not finished for the other."""
    work, embed = small
    ws = Workspace(work)
    cache = PatchCache(ws.patch_path("S1", PatchSpec()))
    encoder = load_encoder(embed)
    on_cpu = recipe(embed.model_copy(update={"device": "cpu"}), encoder, cache)
    on_gpu = recipe(embed.model_copy(update={"device": "cuda"}), encoder, cache)
    assert on_cpu["precision"] == "auto" and on_gpu["precision"] == "bf16"
    assert recipe(embed.model_copy(update={"device": "cuda", "precision": "bf16"}), encoder, cache) == on_gpu
    made_on_cpu = ws.embedding_path(embed, "S1", PatchSpec())
    assert finished(made_on_cpu, on_cpu, cache) and not finished(made_on_cpu, on_gpu, cache)


def test_prepared_samples_carry_the_scverse_spatial_layout(small):
    """squidpy.pl.spatial_scatter / scanpy.pl.spatial read uns["spatial"][library_id]: a hires image whose
    scale maps obsm["spatial"] (level-0 px) onto it, and the spot diameter in level-0 px."""
    work, _ = small
    adata = ad.read_h5ad(work / "samples" / "S1.h5ad")
    library = adata.uns["spatial"]["S1"]
    hires, factors = library["images"]["hires"], library["scalefactors"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and hires.shape[2] == 3
    xy = adata.obsm["spatial"] * factors["tissue_hires_scalef"]
    assert (xy >= 0).all() and (xy[:, 0] < hires.shape[1]).all() and (xy[:, 1] < hires.shape[0]).all()
    assert isinstance(factors["spot_diameter_fullres"], float) and factors["spot_diameter_fullres"] > 0
    assert isinstance(adata.uns["he2st"]["pixel_size_um"], float)


def test_context_field_is_cut_embedded_and_loaded_beside_the_spot(small):
    """``prepare`` cuts a field 3x the spot's around it, ``embed`` embeds it, spot bundles carry it."""
    work, embed = small
    ws = Workspace(work)
    field = PatchSpec().context_field()
    assert field.field_um == 3 * PatchSpec().field_um and field.size_px == PatchSpec().size_px
    spot_patches, field_patches = PatchCache(ws.patch_path("S1", PatchSpec())), PatchCache(ws.patch_path("S1", field))
    assert field_patches.barcodes == spot_patches.barcodes
    assert not np.array_equal(field_patches.read(), spot_patches.read())
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(**GENES))
    spots = load_spots(ws, ["S1", "S2"], PatchSpec(), embed, panel, with_targets=False)
    assert spots.views["field"].shape == spots.features.shape
    assert not np.allclose(spots.views["field"], spots.features)


def test_interrupted_embedding_resumes(small, tmp_path):
    work, embed = small
    ws = Workspace(work)
    final = ws.embedding_path(embed, "S2", PatchSpec())
    reference = EmbeddingFile(final).embeddings
    target = tmp_path / "S2.h5"
    partial = tmp_path / "S2.h5.partial.h5"
    shutil.copy(final, partial)
    record_output(partial)  # as he2st lists the partial files it makes
    with h5py.File(partial, "a") as fh:  # pretend the run died after 10 rows
        fh.attrs["n_done"] = 10
        fh["embeddings"][10:] = 0
    cfg = embed.model_copy(update={"batch_size": 8})
    result = embed_cache(load_encoder(cfg), PatchCache(ws.patch_path("S2", PatchSpec())), target, cfg)
    assert not result.reused and not partial.exists()
    np.testing.assert_allclose(EmbeddingFile(target).embeddings, reference, atol=1e-5)


def test_stain_and_tta_are_applied_and_recorded(small, tmp_path):
    work, embed = small
    cache = PatchCache(Workspace(work).patch_path("S3", PatchSpec()))
    encoder = load_encoder(embed)
    plain = embed_cache(encoder, cache, tmp_path / "plain.h5", embed)
    tta = embed_cache(encoder, cache, tmp_path / "tta.h5", embed.model_copy(update={"tta": "flips", "stain": "macenko"}))
    a, b = EmbeddingFile(plain.path), EmbeddingFile(tta.path)
    assert (b.attrs["tta"], b.attrs["stain"]) == ("flips", "macenko") and a.attrs["tta"] == "none"
    assert a.embeddings.shape == b.embeddings.shape and not np.allclose(a.embeddings, b.embeddings)


def test_train_then_evaluate_held_out_patient(small, tmp_path):
    work, embed = small
    config = TrainRunConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, method="bleep",
                            method_options=TINY, train_samples=["S2", "S3"], out=tmp_path / "bleep.pt")
    model, log, path = train_model(config)
    assert path.exists() and model.card.training_samples == {"S2": "P2", "S3": "P3"} and log.curves["train_loss"]
    assert load_method(path).card.training_pixel_size_um == {"S2": pytest.approx(1.0), "S3": pytest.approx(1.0)}
    assert set(model.card.gene_sets) == {"all", "heg5", "hvg5"}
    assert load_method(path).card.curves == log.curves  # the curves travel with the checkpoint
    result, table, paths = evaluate_model(path, work, ["S1"], tmp_path / "eval")
    scores = result.set_scores()
    assert scores["all"]["n_genes"] == 50 and np.isfinite(scores["all"]["pearson_mean"])
    assert "heg5" in table and json.loads(paths["json"].read_text())["provenance"]["samples"] == ["S1"]
    with pytest.raises(He2stError, match="patients the model was trained on"):
        evaluate_model(path, work, ["S3"], tmp_path / "leaky")
    assert not (tmp_path / "leaky").exists()


def test_evaluate_feeds_a_model_trained_end_to_end_its_patches(small, tmp_path):
    """A fine-tuned encoder reads raw patches, not the cached features: `he2st evaluate` must load them."""
    work, embed = small
    options = {"bleep": {"ensemble": 1, "finetune_encoder": True, "encoder_weights": str(embed.weights),
                         "train": {"epochs": 1, "batch_size": 16}}}
    config = TrainRunConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, method="bleep",
                            method_options=options, train_samples=["S2", "S3"], out=tmp_path / "e2e.pt")
    model, _, path = train_model(config)
    assert model.uses_patches and model.nets[0].encoder is not None
    result, _, _ = evaluate_model(path, work, ["S1"], tmp_path / "eval")
    assert result.set_scores()["all"]["n_genes"] == 50


def test_evaluate_refuses_a_trained_on_sample_whatever_its_patient_is_called(tmp_path):
    """A work folder may name a trained-on section's patient differently (a sample sheet against a registered
    dataset): the section is still refused, by its id."""
    genes = [f"G{i}" for i in range(30)]
    work, embed = embedded_sections(tmp_path / "a", {"S1": "P1", "S2": "P2"}, genes)
    config = TrainRunConfig(work_dir=work, embed=embed, method="knn", method_options={"knn": {"top_k": 5}},
                            genes={"n_genes": 20, "min_spot_fraction": 0.0}, n_top=5, reliability=False,
                            out=tmp_path / "knn.pt")
    _, _, path = train_model(config)
    elsewhere, _ = embedded_sections(tmp_path / "b", {"S1": "patient-1"}, genes)
    with pytest.raises(He2stError, match="were trained on"):
        evaluate_model(path, elsewhere, ["S1"], tmp_path / "leaky")
    result, _, _ = evaluate_model(path, elsewhere, ["S1"], tmp_path / "scored", allow_training_patients=True)
    assert result.method == "knn_LEAKY"


def test_cli_embed_train_evaluate(small, tmp_path):
    from he2st.cli import app

    work, embed = small
    runner = CliRunner()
    sets = ["--set", f"embed.weights={embed.weights}", "--set", "embed.num_workers=0"]
    res = runner.invoke(app, ["embed", "-w", str(work), "--encoder", "test_vit", *sets])
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output
    model = tmp_path / "knn.pt"
    res = runner.invoke(app, ["train", "-w", str(work), "--method", "knn", "--samples", "S1,S2", "--out", str(model),
                              "--set", "embed.encoder=test_vit", *sets, "--set", "genes.n_genes=50",
                              "--set", "genes.min_spot_fraction=0", "--set", f"n_top={N_TOP}"])
    assert res.exit_code == 0, res.output
    assert "trained knn on S1, S2 (patients P1, P2) (50 genes" in res.output and model.exists()
    assert "best epoch" not in res.output  # knn has no epochs: nothing to say about one
    res = runner.invoke(app, ["card", str(model)])  # the model card, for a person
    assert res.exit_code == 0, res.output
    for expected in ("model: knn (he2st", "trained on: S1, S2 (patients P1, P2)", "intended tissue: not stated",
                     "encoder: test_vit", "panel: 50 genes on the log1p_cp10k scale", "known scores: none recorded",
                     "command: he2st "):  # sys.argv of this process (pytest here)
        assert expected in res.output, (expected, res.output)
    res = runner.invoke(app, ["evaluate", "-w", str(work), "--model", str(model), "--samples", "S3",
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "heg5" in res.output and (tmp_path / "ev" / "results.json").exists()
    res = runner.invoke(app, ["evaluate", "-w", str(work), "--model", str(model), "--samples", "S2",
                              "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, He2stError) and "patients the model was trained on" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_benchmark_never_fits_on_a_test_patient(small):
    work, embed = small
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, name="audit",
                          methods=["ridge", "knn", "bleep"], transcriptome_threshold=0.0,
                          method_options=TINY | {"knn": TINY["knn"] | {"context_field": True}})
    outcome = run_benchmark(cfg)
    folds, patients = Workspace(work).load_folds("lopo")
    assert len(outcome.audits) == 3 * len(folds)
    for (method, fold_name), audit in outcome.audits.items():
        used = audit.used_for_fitting()
        assert used and not {patients[s] for s in used} & {patients[s] for s in audit.test}, (method, fold_name)
    results = json.loads(outcome.paths["json"].read_text())
    # each sample's file, its spot embeddings and its context-field embeddings (knn reads them): every file
    # the folds read
    assert results["provenance"]["command"] and len(results["provenance"]["data_checksums_sha256"]) == 9
    assert "heg5" in outcome.table and "heg5_testselected" in outcome.table
    # retrieval methods (knn with its context too) also score every gene measured in all training samples
    # (60, beyond the panel's 50); ridge predicts the panel only
    for name in ("bleep", "knn"):
        run = next(r for r in outcome.results if r.method == name)
        assert "transcriptome_pearson_mean" in run.extra and all(np.isfinite(v) for v in run.extra.values())
    assert not next(r for r in outcome.results if r.method == "ridge").extra
    assert (work / "runs" / "audit" / "config.yaml").exists()


def test_unlabelled_images_join_carhe_and_never_their_counts(small, tmp_path, monkeypatch):
    """``unlabelled=test`` gives CarHE the held-out slide's image features (no expression) and the audit says
    so apart from what was fitted on; other methods ignore it; ``he2st train --unlabelled`` names samples."""
    from he2st.methods.models.carhe import CarHE

    work, embed = small
    seen = []
    real_fit = CarHE.train_modules

    def spy(self, train, val, unlabelled):
        seen.append(None if unlabelled is None else (sorted(set(unlabelled.sample_ids)), unlabelled.targets))
        return real_fit(self, train, val, unlabelled)

    monkeypatch.setattr(CarHE, "train_modules", spy)
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, name="unlabelled",
                          methods=["carhe", "knn"], method_options=TINY, transcriptome_threshold=None, tls=False,
                          reliability=False, unlabelled="test")
    outcome = run_benchmark(cfg)
    for (method, _), audit in outcome.audits.items():
        assert audit.images_only == (audit.test if method == "carhe" else [])
        assert not audit.used_for_fitting() & set(audit.test)
    assert [ids for ids, _ in seen] == [f.test for f in Workspace(work).load_folds("lopo")[0]]
    assert all(targets is None for _, targets in seen)
    with pytest.raises(He2stError, match="unlabelled names samples that are not prepared here: S9"):
        train_model(TrainRunConfig(work_dir=work, embed=embed, genes=GENES, method="carhe", method_options=TINY,
                                   train_samples=["S1", "S2"], unlabelled=["S9"], out=tmp_path / "c.pt"))
    with pytest.raises(He2stError, match="method 'knn' does not learn from image-only spots"):
        train_model(TrainRunConfig(work_dir=work, embed=embed, genes=GENES, method="knn", train_samples=["S1", "S2"],
                                   unlabelled=["S3"], out=tmp_path / "k.pt"))
    model, _, _ = train_model(TrainRunConfig(work_dir=work, embed=embed, genes=GENES, method="carhe",
                                             method_options=TINY, train_samples=["S1", "S2"], unlabelled="S3",
                                             reliability=False, out=tmp_path / "c.pt"))
    assert model.card.selection["unlabelled_images"] == ["S3"] and seen[-1][0] == ["S3"]


def test_learning_curve_refits_on_nested_subsets_of_training_data(small, tmp_path):
    """``learning_curve`` refits every method on the first k training patients (one seeded order) and on
    shares of the training spots; the full amount reproduces the fold's own score; the CLI draws the plot."""
    from he2st.cli import app
    from he2st.workflows.learning_curve import patient_order

    work, embed = small
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, name="curve",
                          methods=["knn", "ridge_cv"], method_options=TINY, transcriptome_threshold=None, tls=False,
                          reliability=False, learning_curve=[1, 2, 0.5])
    lines: list[str] = []
    outcome = run_benchmark(cfg, log=lines.append)
    curve = outcome.curve
    assert any("2 patients: the fold trains on 2 patient(s): its `all` point" in line for line in lines)
    folds, patients = Workspace(work).load_folds("lopo")
    assert set(curve["amount"]) == {"1 patient", "50% of spots", "all"}  # 2 patients: all a fold has
    heg = curve[curve["gene_set"] == f"heg{N_TOP}"]
    assert len(heg) == len(folds) * 2 * 3
    one = heg[heg["amount"] == "1 patient"]
    assert (one["n_train_patients"] == 1).all() and (one["n_train_spots"] == 25).all()
    assert (heg[heg["amount"] == "50% of spots"]["n_train_spots"] == 25).all()
    full = {(r.method, r.fold): r.set_scores()[f"heg{N_TOP}"]["pearson_mean"] for r in outcome.results}
    for row in heg[heg["amount"] == "all"].itertuples():
        assert row.pearson_mean == pytest.approx(full[(row.method, row.fold)])
    fold = folds[0]
    assert patient_order(fold, patients, 0) == patient_order(fold, patients, 0)
    assert (work / "runs" / "curve" / "learning_curve.csv").exists() and "Learning curve" in outcome.table
    with pytest.raises(Exception, match="whole numbers of patients or shares"):
        BenchmarkConfig(work_dir=work, learning_curve=[1.5])
    result = CliRunner().invoke(app, ["benchmark", "-w", str(work), "--methods", "knn", "--name", "curve_cli",
                                      "--set", f"embed.encoder={embed.encoder}", "--set", f"embed.weights={embed.weights}",
                                      "--set", "embed.num_workers=0", "--set", "genes.n_genes=50",
                                      "--set", "genes.min_spot_fraction=0", "--set", f"n_top={N_TOP}",
                                      "--set", "transcriptome_threshold=null", "--set", "tls=false",
                                      "--set", "learning_curve=[1]"])
    assert result.exit_code == 0, result.output
    assert (work / "runs" / "curve_cli" / "learning_curve.png").stat().st_size > 1000


def test_fold_card_records_the_training_slides_pixel_size(small):
    """Benchmark models carry the µm/px of their fold's training slides (predict's resolution limit)."""
    work, embed = small
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, transcriptome_threshold=None)
    folds, patients = Workspace(work).load_folds("lopo")
    fold = next(f for f in folds if f.test == ["S1"])
    card = build_fold_data(Workspace(work), fold, cfg, patients).card
    assert card.training_pixel_size_um == {s: pytest.approx(Workspace(work).load_sample(s).pixel_size_um)
                                           for s in fold.train}


def test_benchmark_seeds_start_at_the_methods_own_seed(small):
    """``method_options.<method>.seed`` sets the first seed of that method (the run's ``seed`` is the default):
    a figure quoted with that option is the one the command prints."""
    work, embed = small
    options = TINY | {"bleep": TINY["bleep"] | {"seed": 7}}
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, name="seeds", seed=3, seeds=2,
                          methods=["bleep", "mlp"], method_options=options, transcriptome_threshold=None, tls=False)
    outcome = run_benchmark(cfg)
    seeds = {r.method: sorted(r.curves) for r in outcome.results if r.fold == outcome.results[0].fold}
    assert seeds == {"bleep": ["seed7", "seed8"], "mlp": ["seed3", "seed4"]}


def test_nested_folds_never_touch_the_outer_test_patient(small):
    work, embed = small
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, name="inner", methods=["ridge"],
                          method_options=TINY, inner_of="patient_P2", transcriptome_threshold=None)
    outcome = run_benchmark(cfg)
    assert sorted(f for _, f in outcome.audits) == ["patient_P2__patient_P1", "patient_P2__patient_P3"]
    for audit in outcome.audits.values():
        assert "S2" not in audit.used_for_fitting() | set(audit.test)


def test_nested_folds_keep_the_outer_test_patients_references_out_and_refuse_unnamed_ones(small, tmp_path):
    """Inner folds carry the outer fold's test samples (``excluded``): a her2st reference section of that
    patient stays out of their banks as it stays out of the outer fold's; and ``reference_sections`` is refused
    where a held-out sample is not named as a her2st section (its patient's sections could not be told)."""
    from he2st.data.splits import Fold, inner_folds, leave_one_patient_out
    from he2st.workflows.protocol import allowed_references, check_references

    samples = {"A1": "A", "B4": "B", "C2": "C", "C3": "C"}
    inner = inner_folds(leave_one_patient_out(samples), samples, "patient_A")
    assert [f.excluded for f in inner] == [["A1"], ["A1"]]
    for fold in inner:
        assert allowed_references(["A2", "D1"], [*fold.test, *fold.excluded], samples) == ["D1"]
    config = BenchmarkConfig(work_dir=tmp_path, reference_sections=["D1"])
    check_references(config, inner)
    with pytest.raises(He2stError, match="fold x holds out 'her2st_B4', whose her2st patient cannot be told"):
        check_references(config, [Fold(name="x", train=["A1"], test=["her2st_B4"])])


def test_folds_whose_patients_the_samples_no_longer_record_are_refused(small, tmp_path):
    """Samples prepared again with other patients beside a folds file written before: the folds would put one
    patient on both sides, so the benchmark refuses them in one line before any work."""
    import json
    import shutil

    work, embed = small
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    path = Workspace(copy).folds_path("lopo")
    payload = json.loads(path.read_text())
    payload["patients"]["S3"] = "P9"
    path.write_text(json.dumps(payload))
    with pytest.raises(He2stError, match=r"the lopo folds give sample S3 patient 'P9', its sample file 'P3'"):
        run_benchmark(BenchmarkConfig(work_dir=copy, embed=embed, genes=GENES, n_top=N_TOP, methods=["ridge"],
                                      method_options=TINY))


@pytest.mark.slow
def test_model_predicted_at_a_samples_own_spots_with_plots_and_report(small, tmp_path):
    """Whole-slide prediction at the spots of a prepared sample, compared with its measurements."""
    from he2st.data.sample import Sample
    from he2st.report.html import build_report
    from he2st.report.plots import plot_prediction
    from he2st.workflows.predict_slide import predict_slide

    work, embed = small
    ws = Workspace(work)
    model = tmp_path / "knn.pt"
    train_model(TrainRunConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, method="knn",
                               train_samples=["S2", "S3"], out=model))
    out = predict_slide(model, None, tmp_path / "pred", spots_from=ws.sample_path("S1"), chunk=16,
                        weights=embed.weights)
    adata = ad.read_h5ad(out)
    s1 = Sample.load(ws.sample_path("S1"))
    assert adata.n_obs == 25 and list(adata.obs_names) == list(s1.adata.obs_names) and adata.n_vars == 50
    assert np.isfinite(adata.X).all() and adata.uns["he2st"]["spots"] == "sample:S1"
    np.testing.assert_array_equal(adata.obsm["spatial"], s1.spatial)
    # the features at prediction are the ones the model was trained with: same patches, same encoder
    own = EmbeddingFile(ws.embedding_path(embed, "S1", PatchSpec())).embeddings
    np.testing.assert_allclose(adata.X, _predict_features(model, own), rtol=1e-4, atol=1e-4)
    paths = plot_prediction(out, tmp_path / "figs", sample=s1)
    assert {"maps", "compare", "scatter"} <= set(paths) and all(p.exists() for p in paths.values())
    page = build_report(out, tmp_path / "report.html", sample=s1).read_text()
    assert "Predicted vs measured (S1)" in page and "25 spots matched by barcode" in page
    # another section is refused, whether named by its spots or only by its slide
    from he2st.errors import He2stError

    s2 = Sample.load(ws.sample_path("S2"))
    with pytest.raises(He2stError, match="made at the spots of S1, not of sample S2"):
        plot_prediction(out, tmp_path / "figs2", sample=s2)
    from in_process import run_cli

    refused = run_cli("plot", out, "--sample", ws.sample_path("S2"), "--out", tmp_path / "figs2")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and refused.stderr.startswith("error:")
    del adata.uns["he2st"]["spots"]
    adata.write_h5ad(tmp_path / "hexgrid.h5ad")
    with pytest.raises(He2stError, match="sample S2 was measured on .*not the same slide"):
        build_report(tmp_path / "hexgrid.h5ad", tmp_path / "report2.html", sample=s2)
    assert not (tmp_path / "figs2").exists() and not (tmp_path / "report2.html").exists()


def test_ensemble_predicts_a_whole_slide_as_one_sample(small, tmp_path):
    """The ensemble standardises its members within each predicted slide, so whole-slide prediction predicts
    every spot together, not chunk by chunk: the same as predicting all the sample's spots at once."""
    from he2st.workflows.predict_slide import predict_slide

    work, embed = small
    ws = Workspace(work)
    model = tmp_path / "ensemble.pt"
    members = {"knn": {"method": "knn", "top_k": 5, "context_neighbours": 0},
               "ridge": {"method": "ridge", "pca_components": 8, "context_neighbours": 0}}
    train_model(TrainRunConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, method="ensemble",
                               method_options={"ensemble": {"members": members}}, train_samples=["S2", "S3"],
                               out=model))
    assert load_method(model).combination.deviations is not None  # two training patients: two inner folds
    out = predict_slide(model, None, tmp_path / "pred", spots_from=ws.sample_path("S1"), chunk=8,
                        weights=embed.weights)
    own = EmbeddingFile(ws.embedding_path(embed, "S1", PatchSpec())).embeddings
    np.testing.assert_allclose(ad.read_h5ad(out).X, _predict_features(model, own), rtol=1e-4, atol=1e-4)


def _predict_features(model_path, features: np.ndarray) -> np.ndarray:
    from he2st.data.spots import SpotSet

    method = load_method(model_path)
    n = len(features)
    spots = SpotSet(np.array(["S1"] * n, dtype=object), np.arange(n).astype(str).astype(object), features,
                    np.zeros((n, 2)), method.panel.genes)
    return method.predict(spots).expression


def test_predictions_do_not_read_test_expression(small, tmp_path):
    """A test sample with its counts zeroed gives the same predictions, for every method."""
    work, embed = small
    stripped = tmp_path / "work"
    for sub in ("samples", "embeddings", "folds"):
        shutil.copytree(work / sub, stripped / sub)
    adata = ad.read_h5ad(stripped / "samples" / "S1.h5ad")
    adata.X = adata.X * 0
    adata.write_h5ad(stripped / "samples" / "S1.h5ad")
    cfg = BenchmarkConfig(work_dir=work, embed=embed, genes=GENES, n_top=N_TOP, method_options=TINY,
                          transcriptome_threshold=None)
    folds, patients = Workspace(work).load_folds("lopo")
    fold = next(f for f in folds if f.test == ["S1"])
    full = build_fold_data(Workspace(work), fold, cfg, patients)
    blind = build_fold_data(Workspace(stripped), fold, cfg.model_copy(update={"work_dir": stripped}), patients)
    assert blind.test_inputs.targets is None
    assert sorted(TINY) == sorted(list_methods())
    for method in list_methods():
        a = run_fold(method, full, cfg).predictions["S1"]
        b = run_fold(method, blind, cfg).predictions["S1"]
        assert a.expression.shape == (25, 50) and np.isfinite(a.expression).all(), method
        np.testing.assert_array_equal(a.expression, b.expression, err_msg=method)


def test_every_runtime_gives_the_same_embeddings_and_is_recorded(small, tmp_path):
    """The default (a validated ONNX graph when one is installed) and torch agree within 1e-4."""
    from he2st.encoders.runtime import FP32_TOLERANCE

    work, embed = small
    cache = PatchCache(Workspace(work).patch_path("S3", PatchSpec()))
    encoder = load_encoder(embed)
    files = {runtime: EmbeddingFile(embed_cache(encoder, cache, tmp_path / f"{runtime}.h5",
                                                embed.model_copy(update={"runtime": runtime})).path)
             for runtime in ("torch", "auto")}
    assert files["torch"].attrs["runtime"] == "torch" and files["auto"].attrs["runtime"] in ("openvino", "onnxruntime")
    assert np.abs(files["torch"].embeddings - files["auto"].embeddings).max() <= FP32_TOLERANCE



def test_train_refuses_an_engine_beside_data_parallel_training(small, tmp_path):
    work, embed = small
    config = TrainRunConfig(work_dir=work, embed=embed, method="knn", devices=2, engine="local",
                            out=tmp_path / "knn.pt")
    with pytest.raises(He2stError, match="cannot be combined with data-parallel"):
        train_model(config)
    assert not (tmp_path / "knn.pt").exists()


@pytest.mark.slow  # two worker processes start (torch imported in each)
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_train_on_an_engine_gives_the_model_of_a_serial_fit(small, tmp_path, engine):
    """`he2st train --engine local|ray --workers 2`: the ensemble's inner-fold fits and refits run as tasks of
    two workers; the checkpoint scores the held-out patient as the serial one does and carries the same
    selection and reliability (knn and ridge_cv members: their fits do not depend on the number of threads)."""
    if engine == "ray":
        pytest.importorskip("ray")
    work, embed = small
    options = {"ensemble": {"members": {"knn": {"method": "knn", "top_k": 5},
                                        "ridge": {"method": "ridge_cv", "pca_components": 8}}}}
    common = {"work_dir": work, "embed": embed, "genes": GENES, "n_top": N_TOP, "method": "ensemble",
              "method_options": options, "train_samples": ["S2", "S3"], "reliability": True}
    runs = {name: train_model(TrainRunConfig(**common, engine=name, workers=2, out=tmp_path / f"{name}.pt"))
            for name in ("serial", engine)}
    (serial, log, path), (pooled, log_p, path_p) = runs["serial"], runs[engine]
    assert log_p.selection["inner_pearson"] == log.selection["inner_pearson"]
    np.testing.assert_array_equal(pooled.reliability.expected_r, serial.reliability.expected_r)
    scores = [evaluate_model(p, work, ["S1"], tmp_path / name)[0].set_scores()["all"]["pearson_mean"]
              for name, p in (("serial", path), ("pooled", path_p))]
    assert scores[0] == scores[1] and np.isfinite(scores[0])


@pytest.mark.slow
def test_embed_on_an_engine_equals_embedding_one_by_one(small, tmp_path):
    """`he2st embed --engine local --workers 2`: one task per sample, the same files as a sequential run."""
    from in_process import run_cli

    work, embed = small
    copy = tmp_path / "work"
    for sub in ("samples", "patches", "folds"):
        shutil.copytree(work / sub, copy / sub)
    result = run_cli("embed", "-w", copy, "--engine", "local", "--workers", "2", "--encoder", "test_vit",
                     "--weights", embed.weights, "--set", "embed.num_workers=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("done\t") == 3
    for sid in PATIENTS:
        for spec in (PatchSpec(), PatchSpec().context_field()):
            ours = EmbeddingFile(Workspace(copy).embedding_path(embed, sid, spec))
            theirs = EmbeddingFile(Workspace(work).embedding_path(embed, sid, spec))
            np.testing.assert_allclose(ours.embeddings, theirs.embeddings, atol=1e-6)
            assert ours.barcodes == theirs.barcodes
