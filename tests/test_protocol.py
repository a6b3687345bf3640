"""The evaluation protocol on real her2st data: embeddings, no leakage, CLI train/evaluate/benchmark."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.io import record_output
from he2st.methods import list_methods
from he2st.workflows.benchmark import run_benchmark
from he2st.workflows.config import BenchmarkConfig
from he2st.workflows.embed import embed_cache, embed_workspace
from he2st.workflows.protocol import allowed_references, build_fold_data, run_fold

FAST = {"bleep": {"ensemble": 1, "train": {"epochs": 6}}, "bleep_faithful": {"train": {"epochs": 6}},
        "mlp": {"train": {"epochs": 6}}, "cmrcnet": {"train": {"epochs": 4}}, "nh2st": {"train": {"epochs": 4}},
        "carhe": {"histology_pretrain_epochs": 2, "train": {"epochs": 4}},
        # the presets' own schedules, cut short ("train" replaces a preset's whole training block)
        "cmrcnet_faithful": {"train": {"epochs": 4, "batch_size": 64, "lr": 1e-4, "weight_decay": 1e-3,
                                       "schedule": "cosine", "min_lr": 1e-5, "grad_clip": None}},
        "nh2st_faithful": {"train": {"epochs": 2, "batch_size": 8, "lr": 5e-4, "weight_decay": 0.0,
                                     "schedule": "step", "grad_clip": None}},
        "ensemble": {"members": {"knn": {"method": "knn"}, "ridge_cv": {"method": "ridge_cv"},
                                 "bleep": {"method": "bleep", "ensemble": 1, "train": {"epochs": 3}}}}}
TOKENS = EmbedConfig(token_grid=2)  # pooled embeddings plus a 2 x 2 grid of the encoder's feature map

# every test here embeds all 7 real sections (and most train methods on them): the full loop only;
# test_pipeline_small.py runs the same checks on a tiny synthetic work folder in the fast loop
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embedded(prepared):
    """The 7 imaged sections embedded once with the default offline encoder (real weights, CPU)."""
    ws = Workspace(prepared)
    summary = embed_workspace(ws, ws.sample_ids(), PatchSpec(), EmbedConfig())
    return prepared, summary


def test_one_embedding_per_under_tissue_spot_and_rerun_is_noop(embedded):
    work, summary = embedded
    ws = Workspace(work)
    files = {sid: EmbeddingFile(p) for sid, p in summary.paths.items()}
    assert sum(len(f.barcodes) for f in files.values()) == 1539
    for sid, f in files.items():
        assert f.barcodes == list(ws.load_sample(sid).adata.obs_names)
        assert f.embeddings.shape[1] == 1280 and np.isfinite(f.embeddings).all()
        assert json.loads(f.attrs["encoder_spec"])["name"] == "efficientnet_lite0"
    mtimes = {p: p.stat().st_mtime_ns for p in summary.paths.values()}
    again = embed_workspace(ws, ws.sample_ids(), PatchSpec(), EmbedConfig())
    assert again.n_embedded == 0 and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_interrupted_embedding_resumes(embedded, tmp_path):
    work, summary = embedded
    ws = Workspace(work)
    final = summary.paths["C2"]
    reference = EmbeddingFile(final).embeddings
    partial = tmp_path / "C2.h5.partial.h5"
    shutil.copy(final, partial)
    with h5py.File(partial, "a") as fh:  # pretend the run died after 64 rows
        fh.attrs["n_done"] = 64
        fh["embeddings"][64:] = 0
    record_output(partial)  # as he2st lists the partial files it makes
    target = tmp_path / "C2.h5"
    from he2st.encoders.inference import load_encoder

    cfg = EmbedConfig()
    result = embed_cache(load_encoder(cfg), PatchCache(ws.patch_path("C2", PatchSpec())), target, cfg)
    assert not result.reused and not partial.exists()
    np.testing.assert_allclose(EmbeddingFile(target).embeddings, reference, atol=1e-4)


def test_patch_cache_from_other_settings_is_refused(embedded):
    work, _ = embedded
    ws = Workspace(work)
    other = PatchSpec(field_um=200, size_px=224)
    shutil.copy(ws.patch_path("C2", PatchSpec()), ws.patch_path("C2", other))
    try:
        with pytest.raises(He2stError, match="cut with 112um_224px"):
            embed_workspace(ws, ["C2"], other, EmbedConfig())
    finally:
        ws.patch_path("C2", other).unlink()


@pytest.fixture(scope="session")
def token_embedded(embedded):
    """A1 (patient A) and B4 (patient B) embedded again with a cached token grid."""
    work, _ = embedded
    ws = Workspace(work)
    return work, embed_workspace(ws, ["A1", "B4"], PatchSpec(), TOKENS)


def test_token_grid_is_cached_without_changing_the_embeddings(token_embedded):
    work, summary = token_embedded
    ws = Workspace(work)
    for sid, path in summary.paths.items():
        with_tokens, plain = EmbeddingFile(path), EmbeddingFile(ws.embedding_path(EmbedConfig(), sid, PatchSpec()))
        assert path != plain.path and with_tokens.attrs["token_grid"] == "2" and not plain.has_tokens
        np.testing.assert_allclose(with_tokens.embeddings, plain.embeddings, rtol=1e-5, atol=1e-5)
        tokens = with_tokens.tokens()
        assert tokens.shape == (len(plain.barcodes), 4, 1280) and np.isfinite(tokens).all()
        assert tokens.std(axis=1).mean() > 0  # the four quadrants differ


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_and_predicts_end_to_end_on_two_real_sections(method, token_embedded, tmp_path):
    """Train on section B4 (patient B), predict and score section A1 (patient A): real images, counts,
    cell-type proportions and (for CMRCNet) the encoder's token grid."""
    from he2st.workflows.config import TrainRunConfig
    from he2st.workflows.evaluate import evaluate_model
    from he2st.workflows.train import train_model

    work, _ = token_embedded
    config = TrainRunConfig(work_dir=work, embed=TOKENS, method=method, method_options=FAST,
                            train_samples=["B4"], out=tmp_path / f"{method}.pt")
    model, log, path = train_model(config)
    assert path.exists() and model.card.training_samples == {"B4": "B"}
    if method == "cmrcnet":
        assert model.token_scaler is not None  # trained on real tokens
        assert (model.dims["token_dim"], model.dims["n_tokens"]) == (1280, 4)
    if method == "carhe":
        assert "proportion_head" in dict(model.net.named_children())  # trained with B4's proportions
    result, table, paths = evaluate_model(path, work, ["A1"], tmp_path / "eval")
    scores = result.set_scores()
    assert np.isfinite(scores["all"]["pearson_mean"]) and scores["all"]["n_genes"] == 250, method
    assert paths["json"].exists() and "heg50" in table


def test_no_test_patient_spot_is_used_for_fitting_anything(embedded):
    work, _ = embedded
    cfg = BenchmarkConfig(work_dir=work, name="audit", methods=["bleep", "ridge", "knn"], method_options=FAST,
                          reference_sections=["A2", "D1"])
    outcome = run_benchmark(cfg)
    folds, patients = Workspace(work).load_folds("lopo")
    assert len(outcome.audits) == 3 * len(folds)
    for (method, fold_name), audit in outcome.audits.items():
        test_patients = {patients[s] for s in audit.test}
        used = audit.used_for_fitting()
        used_patients = {patients.get(s, s[0]) for s in used}
        assert not used_patients & test_patients, (method, fold_name, used)
        assert not set(audit.test) & used
        if fold_name == "patient_A" and method in ("bleep", "knn"):
            assert "A2" not in audit.reference_bank  # expression-only section of the test patient stays out
        if fold_name != "patient_A" and method == "bleep":
            assert "A2" in audit.reference_bank and "D1" in audit.reference_bank
    results = json.loads(outcome.paths["json"].read_text())
    assert results["provenance"]["command"] and results["provenance"]["data_checksums_sha256"]
    assert "heg50" in outcome.table and "heg50_testselected" in outcome.table
    bleep_a = next(f for f in results["folds"] if f["method"] == "bleep" and f["fold"] == "patient_A")
    assert bleep_a["curves"]["seed0"]["val_pearson"]  # training curves travel with the scores
    kept = ad.read_h5ad(outcome.paths["json"].parent / "predictions" / "bleep" / "A1.h5ad")
    truth = ad.read_h5ad(Path(work) / "samples" / "A1.h5ad")
    assert kept.n_obs == truth.n_obs and kept.n_vars == 250 and kept.uns["he2st"]["fold"] == "patient_A"
    np.testing.assert_array_equal(kept.obsm["spatial"], truth.obsm["spatial"])
    assert {"best_similarity", "dispersion"} <= set(kept.obs.columns)


def test_nested_folds_inside_an_outer_fold_never_touch_its_test_patient(embedded):
    """``inner_of``: options can be chosen by leave-one-patient-out over an outer fold's training patients."""
    work, _ = embedded
    cfg = BenchmarkConfig(work_dir=work, name="inner", methods=["ridge"], inner_of="patient_B",
                          transcriptome_threshold=None)
    outcome = run_benchmark(cfg)
    _, patients = Workspace(work).load_folds("lopo")
    assert sorted(f for _, f in outcome.audits) == ["patient_B__patient_A", "patient_B__patient_C"]
    for audit in outcome.audits.values():
        touched = audit.used_for_fitting() | set(audit.test)
        assert touched and "B" not in {patients[s] for s in touched}
    checksums = json.loads(outcome.paths["json"].read_text())["provenance"]["data_checksums_sha256"]
    assert not any(patients[Path(k).name.split("__")[0].removesuffix(".h5ad")] == "B" for k in checksums)


def test_predictions_do_not_read_test_expression(embedded, tmp_path):
    """A test sample with its counts (and count-derived proportions) removed gives the same predictions."""
    work, _ = embedded
    stripped = tmp_path / "work"
    for sub in ("samples", "embeddings", "folds"):
        shutil.copytree(work / sub, stripped / sub)
    adata = ad.read_h5ad(stripped / "samples" / "A1.h5ad")
    adata.X = adata.X * 0
    for key in list(adata.obsm):
        if key != "spatial":
            del adata.obsm[key]
    adata.write_h5ad(stripped / "samples" / "A1.h5ad")
    cfg = BenchmarkConfig(work_dir=work, method_options=FAST, transcriptome_threshold=None)
    folds, patients = Workspace(work).load_folds("lopo")
    fold = next(f for f in folds if f.test == ["A1"])
    full = build_fold_data(Workspace(work), fold, cfg, patients)
    blind = build_fold_data(Workspace(stripped), fold, cfg.model_copy(update={"work_dir": stripped}), patients)
    assert blind.test_inputs.targets is None and not blind.test_inputs.extras
    assert full.celltype_truth and not blind.celltype_truth  # truth exists only where scoring may read it
    for method in list_methods():
        a = run_fold(method, full, cfg).predictions["A1"]
        b = run_fold(method, blind, cfg).predictions["A1"]
        np.testing.assert_array_equal(a.expression, b.expression, err_msg=method)
        assert a.extras.keys() == b.extras.keys(), method
        for key in a.extras:
            np.testing.assert_array_equal(a.extras[key], b.extras[key], err_msg=f"{method} {key}")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from he2st.cli import main; main()", *args],
                          capture_output=True, text=True)


def test_cli_train_then_evaluate_held_out_patient(embedded, tmp_path):
    work, _ = embedded
    model = tmp_path / "knn.pt"
    out = cli("train", "-w", str(work), "--method", "knn", "--samples", "B4,C2,C3,C4,C5,C6", "--out", str(model))
    assert out.returncode == 0, out.stderr
    assert model.exists() and (tmp_path / "knn.bank.h5").exists()
    out = cli("evaluate", "-w", str(work), "--model", str(model), "--samples", "A1", "--out", str(tmp_path / "ev"))
    assert out.returncode == 0, out.stderr
    assert "heg50" in out.stdout and (tmp_path / "ev" / "results.json").exists()
    refused = cli("evaluate", "-w", str(work), "--model", str(model), "--samples", "C2", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "patients the model was trained on" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_stain_and_tta_are_applied_and_recorded(embedded, tmp_path):
    from he2st.encoders import create

    work, _ = embedded
    cache = PatchCache(Workspace(work).patch_path("C6", PatchSpec()))
    encoder = create("test_vit", pretrained=False)
    plain = embed_cache(encoder, cache, tmp_path / "plain.h5", EmbedConfig(encoder="test_vit"))
    tta = embed_cache(encoder, cache, tmp_path / "tta.h5", EmbedConfig(encoder="test_vit", tta="flips", stain="macenko"))
    a, b = EmbeddingFile(plain.path), EmbeddingFile(tta.path)
    assert (b.attrs["tta"], b.attrs["stain"]) == ("flips", "macenko") and a.attrs["tta"] == "none"
    assert a.embeddings.shape == b.embeddings.shape and not np.allclose(a.embeddings, b.embeddings)


def test_cli_embed_second_run_is_noop(embedded):
    work, _ = embedded
    out = cli("embed", "-w", str(work))
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout


def test_a_reference_section_of_a_test_patient_is_kept_out_whatever_the_patient_is_called():
    """A work folder may name her2st's patient A 'patient-A' (a sample sheet): A2 is still A1's patient."""
    patients = {"A1": "patient-A", "B1": "patient-B"}
    assert allowed_references(["A2", "B2", "D1"], ["A1"], patients) == ["B2", "D1"]
    assert allowed_references(["A2", "D1"], ["B1"], patients) == ["A2", "D1"]
    assert allowed_references(["A2"], ["mine"], {"mine": "A"}) == []  # a test patient called A by the folder
