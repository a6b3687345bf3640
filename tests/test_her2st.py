"""The foundation on real data: her2st sections, patches, folds, the dataset registry and the CLI."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
from in_process import run_cli

from he2st.data import datasets
from he2st.data.her2st import IMAGED_SECTIONS, load_section
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.slide import read_patch
from he2st.data.workspace import Workspace
from he2st.errors import He2stError


@pytest.mark.parametrize(("section", "spots"), [("A1", 346), ("B4", 283), ("C2", 187)])
def test_info_reports_under_tissue_spots(her2st, section, spots):
    out = run_cli("info", section)
    assert out.returncode == 0, out.stderr
    fields = {k.strip(): v for k, v in (line.split(": ", 1) for line in out.stdout.strip().splitlines())}
    assert int(fields["spots"]) == spots
    assert fields["patient"] == section[0]


def test_c2_pixel_size_from_spot_grid(her2st):
    sample = load_section("C2", her2st)
    assert sample.pixel_size_um == pytest.approx(0.688, abs=5e-4)  # the 1k array: 200 µm per array step
    a1 = load_section("A1", her2st)  # downscaled PNG: ~3.2 µm/px
    assert 2.9 < a1.pixel_size_um < 3.5
    assert "region" in a1.adata.obs and a1.adata.obsm["celltype_major"].shape == (346, 8)


@pytest.mark.slow  # prepares the real her2st sections
def test_tissue_patches_darker_than_background_corner(prepared):
    ws = Workspace(prepared)
    for section in ("B4", "C2"):
        sample = ws.load_sample(section)
        cache = PatchCache(ws.patch_path(section, PatchSpec()))
        assert len(cache) == sample.n_spots and cache.barcodes == list(sample.adata.obs_names)
        tissue_mean = cache.read().mean()
        side = 112 / sample.pixel_size_um
        corner = read_patch(sample.slide, (side / 2 + 5, side / 2 + 5), side, 224)
        assert tissue_mean < corner.mean() - 20, (tissue_mean, corner.mean())


@pytest.mark.slow  # prepares the real her2st sections
def test_lopo_folds_hold_out_whole_patients(prepared):
    folds, patients = Workspace(prepared).load_folds("lopo")
    assert sorted(f.name for f in folds) == ["patient_A", "patient_B", "patient_C"]
    for fold in folds:
        assert not {patients[s] for s in fold.train} & {patients[s] for s in fold.test}
        assert sorted(fold.train + fold.test) == sorted(IMAGED_SECTIONS)


@pytest.mark.slow  # prepares the real her2st sections
def test_panels_fitted_on_training_samples_only(prepared):
    from he2st.data.genes import GeneConfig, GenePanel

    ws = Workspace(prepared)
    assert not (prepared / "panels").exists()  # panels are fitted per fold when a run needs them
    folds, _ = ws.load_folds("lopo")
    for fold in folds:
        panel = GenePanel.from_config({s: ws.load_sample(s).adata for s in fold.train}, GeneConfig())
        assert panel.fitted_on == sorted(fold.train) and panel.n_genes == 250


@pytest.mark.slow  # prepares the real her2st sections
def test_second_patch_run_with_same_settings_reuses_cache(prepared):
    from he2st.data.patches import extract_patches

    ws = Workspace(prepared)
    sample = ws.load_sample("C2")
    path = ws.patch_path("C2", PatchSpec())
    before = path.stat().st_mtime_ns
    assert extract_patches(sample, PatchSpec(), prepared) == path
    assert path.stat().st_mtime_ns == before


def test_registry_lists_every_section_with_pinned_urls_and_checksums(her2st):
    spec = datasets.get_dataset("her2st")
    paths = {f.path for f in spec.files}
    for section in ("A1", "D6", "H3"):
        assert f"data/ST-cnts/{section}.tsv.gz" in paths and f"data/ST-spotfiles/{section}_selection.tsv" in paths
    assert sum(p.startswith("data/ST-cnts/") for p in paths) == 36
    assert all(f.sha256 and len(f.sha256) == 64 for f in spec.files)
    assert spec.url(spec.files[0]).startswith(f"https://raw.githubusercontent.com/almaan/her2st/{spec.commit}/")
    assert datasets.fetch("her2st") == her2st  # the shared copy verifies as a filled cache


def test_fetch_without_internet_names_the_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("HE2ST_DATA_DIR", str(tmp_path))

    def no_network(*_a, **_k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", no_network)
    with pytest.raises(He2stError, match="HE2ST_DATA_DIR"):
        datasets.fetch("her2st")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing half-downloaded


def test_fetch_detects_corrupted_copy(her2st, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(her2st, tmp_path / "her2st")
    victim = tmp_path / "her2st" / "data" / "ST-spotfiles" / "B4_selection.tsv"
    victim.chmod(0o644)
    victim.write_text(victim.read_text()[:100])
    monkeypatch.setenv("HE2ST_DATA_DIR", str(tmp_path))
    with pytest.raises(He2stError, match="checksum"):
        datasets.fetch("her2st")


def test_cli_data_list_and_prepare_config(her2st, tmp_path):
    out = run_cli("data", "list")
    assert out.returncode == 0 and "her2st" in out.stdout and "complete" in out.stdout
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  sections: [B4]\npatch:\n  field_um: 100\n  size_px: 64\nfolds:\n  scheme: lopo\n")
    out = run_cli("prepare", "--config", str(cfg), "--work-dir", str(tmp_path / "w"), "--set", "folds.scheme=loso",
                  "--sections", "B4,A1")
    assert out.returncode == 0, out.stderr
    cache = PatchCache(tmp_path / "w" / "patches" / "B4__100um_64px.h5")
    assert cache.read(0, 2).shape == (2, 64, 64, 3)
    folds = json.loads((tmp_path / "w" / "folds" / "loso.json").read_text())
    assert len(folds["folds"]) == 2
    assert [f["train"] for f in folds["folds"] if f["test"] == ["A1"]] == [["B4"]]
    assert "folds:\n  scheme: loso" in (tmp_path / "w" / "prepare.yaml").read_text()  # --set beat the file
    assert np.isclose(cache.spec.pixel_size_um, 100 / 64)
