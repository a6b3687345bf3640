"""The evaluation protocol on real her2st data: embeddings, no leakage, CLI train/evaluate/benchmark."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pytest

from he2st.config import BenchmarkConfig, EmbedConfig
from he2st.data.patches import PatchCache, PatchSpec
from he2st.embed import EmbeddingFile, embed_workspace
from he2st.errors import He2stError
from he2st.evaluate.benchmark import run_benchmark
from he2st.evaluate.protocol import build_fold_data, run_fold
from he2st.workspace import Workspace

FAST = {"bleep": {"ensemble": 1, "train": {"epochs": 6}}, "bleep_faithful": {"train": {"epochs": 6}},
        "mlp": {"train": {"epochs": 6}}}


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
    target = tmp_path / "C2.h5"
    from he2st.embed import embed_cache, load_encoder

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
    cfg = BenchmarkConfig(work_dir=work, method_options=FAST)
    folds, patients = Workspace(work).load_folds("lopo")
    fold = next(f for f in folds if f.test == ["A1"])
    full = build_fold_data(Workspace(work), fold, cfg, patients)
    blind = build_fold_data(Workspace(stripped), fold, cfg.model_copy(update={"work_dir": stripped}), patients)
    assert blind.test_inputs.targets is None and not blind.test_inputs.extras
    for method in ("bleep", "bleep_faithful", "ridge", "mlp", "knn"):
        a = run_fold(method, full, cfg).predictions["A1"].expression
        b = run_fold(method, blind, cfg).predictions["A1"].expression
        np.testing.assert_array_equal(a, b, err_msg=method)


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
    from he2st.embed import embed_cache
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
