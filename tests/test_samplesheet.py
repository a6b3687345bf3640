"""Sample sheets (``he2st prepare --samplesheet``) and folder search (``--from-dir``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from in_process import run_cli
from PIL import Image
from synthetic import spot_grid, tissue_image, write_space_ranger, write_st_section

from he2st.data.samplesheet import discover_sources, read_samplesheet, with_default_patients
from he2st.errors import He2stError, He2stWarning


def test_prepare_from_a_sheet_writes_the_sheet_it_used(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    a, b = write_st_section(raw / "A", seed=0), write_st_section(raw / "B", seed=1)
    sheet = raw / "samples.csv"
    pd.DataFrame({
        "sample": ["A", "B"], "patient": ["P1", ""], "reader": ["st", "st"],
        "path": ["A/cnts.tsv.gz", str(b["counts"])], "image": ["A/he.jpg", str(b["image"])],
        "spots_file": ["A/sel.tsv", str(b["spots"])],
    }).to_csv(sheet, index=False)
    work = tmp_path / "work"
    res = run_cli("prepare", "--samplesheet", sheet, "-w", work)
    assert res.returncode == 0, res.stderr
    assert "no patient for 1 sample(s) (B)" in res.stderr and "leave-one-sample-out" in res.stderr
    assert sorted(p.stem for p in (work / "samples").glob("*.h5ad")) == ["A", "B"]
    written = read_samplesheet(work / "samplesheet.csv")  # absolute paths: it reads back from the work folder
    assert [s["patient_id"] for s in written] == ["P1", "B"]
    assert Path(str(written[0]["path"])).resolve() == a["counts"].resolve()
    assert "folds (lopo)" in res.stdout  # two patients: P1 and B


def test_a_sheet_whose_section_cannot_be_read_writes_nothing(tmp_path: Path) -> None:
    """The sheet is written into the work folder only once every section it lists has been read."""
    a = write_st_section(tmp_path / "raw" / "A")
    sheet = tmp_path / "raw" / "samples.csv"
    pd.DataFrame({
        "sample": ["A", "B"], "patient": ["P1", "P2"], "reader": ["st", "st"], "path": [str(a["counts"])] * 2,
        "image": [str(a["image"]), str(tmp_path / "raw" / "missing.jpg")], "spots_file": [str(a["spots"])] * 2,
    }).to_csv(sheet, index=False)
    work = tmp_path / "work"
    res = run_cli("prepare", "--samplesheet", sheet, "-w", work)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and str(tmp_path / "raw" / "missing.jpg") in lines[0], res.stderr
    assert not work.exists()


def test_bad_sheet_is_one_line(tmp_path: Path) -> None:
    sheet = tmp_path / "s.csv"
    sheet.write_text("sample,path\nA,x.h5ad\n")
    res = run_cli("prepare", "--samplesheet", sheet, "-w", tmp_path / "w")
    assert res.returncode == 2 and "lacks column(s) reader" in res.stderr and str(sheet) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    sheet.write_text("sample,reader,path\nA,tiff,x.h5ad\n")
    res = run_cli("prepare", "--samplesheet", sheet, "-w", tmp_path / "w")
    assert res.returncode == 2 and "sample 'A': unknown reader 'tiff'" in res.stderr


def test_folder_search_finds_each_kind(tmp_path: Path) -> None:
    root = tmp_path / "study"
    xy = spot_grid(4, 4, 80, (200, 200))
    write_space_ranger(root / "V1" / "outs", xy, np.ones((16, 3), int), ["a", "b", "c"], 60.0)
    Image.fromarray(tissue_image(600, 600)).save(root / "V1" / "V1_fullres.tif")
    write_st_section(root / "st_A")
    adata = ad.AnnData(X=np.ones((4, 2), np.float32))
    adata.obsm["spatial"] = np.zeros((4, 2))
    adata.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 130.0}}}  # 65 µm / 0.5 µm/px
    (root / "h5").mkdir()
    adata.write_h5ad(root / "h5" / "sec9.h5ad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = {s["sample_id"]: s for s in discover_sources(root)}
    assert set(found) == {"V1", "st_A", "sec9"}
    assert found["V1"]["reader"] == "visium" and str(found["V1"]["image"]).endswith("V1_fullres.tif")
    assert found["st_A"]["reader"] == "st" and str(found["st_A"]["spots_file"]).endswith("sel.tsv")
    assert found["sec9"]["reader"] == "h5ad" and found["sec9"]["pixel_size_um"] == pytest.approx(0.5)
    assert [str(w.message) for w in caught if issubclass(w.category, He2stWarning)] == [
        f"{root / 'h5' / 'sec9.h5ad'}: no single slide image found for sample sec9; fill in the image column of "
        "the written sample sheet"]
    with pytest.warns(He2stWarning, match="each is its own patient"):
        assert all(s["patient_id"] == s["sample_id"] for s in with_default_patients(list(found.values()), root))
    with pytest.raises(He2stError, match="no Space Ranger outs"):
        discover_sources(tmp_path / "study" / "V1" / "outs" / "spatial")


def test_folder_search_reads_he2st_sample_files_at_the_pixel_size_they_were_prepared_at(tmp_path: Path) -> None:
    """A Visium sample file's spot_diameter_fullres follows Space Ranger's convention (the pixels a theoretical
    65 µm spot spans), so readers of 10x scale factors take the right µm/px from it; every sample file also
    records microns_per_pixel, which --from-dir reads first (a legacy ST spot is 100 µm, not Visium's)."""
    from he2st.data.readers import read_source

    xy = spot_grid(4, 4, 80, (200, 200))
    write_space_ranger(tmp_path / "V1" / "outs", xy, np.ones((16, 3), int), ["a", "b", "c"], 60.0)
    Image.fromarray(tissue_image(600, 600)).save(tmp_path / "V1" / "he.png")
    st = write_st_section(tmp_path / "st_A")
    visium = read_source({"reader": "visium", "sample_id": "V1", "path": tmp_path / "V1" / "outs",
                          "image": tmp_path / "V1" / "he.png"})
    legacy = read_source({"reader": "st", "sample_id": "st_A", "path": st["counts"], "spots_file": st["spots"],
                          "image": st["image"]})
    assert visium.pixel_size_um == pytest.approx(65.0 / 60.0) and legacy.pixel_size_um == pytest.approx(2.0)
    for sample in (visium, legacy):
        sample.save(tmp_path / "copies" / f"{sample.sample_id}.h5ad")
    factors = ad.read_h5ad(tmp_path / "copies" / "V1.h5ad").uns["spatial"]["V1"]["scalefactors"]
    assert 65.0 / factors["spot_diameter_fullres"] == pytest.approx(visium.pixel_size_um)
    with pytest.warns(He2stWarning, match="no single slide image"):
        found = {s["sample_id"]: s["pixel_size_um"] for s in discover_sources(tmp_path / "copies")}
    assert found == pytest.approx({"V1": visium.pixel_size_um, "st_A": legacy.pixel_size_um})


def test_folder_search_skips_the_work_folder_and_other_he2st_outputs(tmp_path: Path) -> None:
    """Preparing from a folder that holds the work folder finds the same sections when run again: the work
    folder's samples/*.h5ad, and .h5ad files in any folder he2st wrote (its .he2st-output marker), are not
    sections."""
    root = tmp_path / "study"
    write_st_section(root / "st_A")
    (root / "preds").mkdir()
    (root / "preds" / ".he2st-output").write_text("old.h5ad\n")
    adata = ad.AnnData(X=np.ones((4, 2), np.float32))
    adata.obsm["spatial"] = np.zeros((4, 2))
    adata.write_h5ad(root / "preds" / "old.h5ad")
    for run in (1, 2):
        res = run_cli("prepare", "--from-dir", root, "-w", root / "he2st-work")
        assert res.returncode == 0, f"run {run}: {res.stderr}"
        assert "prepared 1 samples (st_A)" in res.stdout
    assert sorted(p.name for p in (root / "he2st-work" / "samples").glob("*.h5ad")) == ["st_A.h5ad"]
    (root / "fresh").mkdir()  # a work folder he2st has not written into yet is left out all the same
    adata.write_h5ad(root / "fresh" / "new.h5ad")
    assert [s["sample_id"] for s in discover_sources(root, work_dir=root / "x" / ".." / "fresh")] == ["st_A"]
    with pytest.warns(He2stWarning, match="for sample new"):  # no image, no pixel size: it is a section here
        assert sorted(s["sample_id"] for s in discover_sources(root)) == ["new", "st_A"]


def test_folder_search_finds_downloaded_visium_hest_patients_and_exact_st_images(tmp_path: Path) -> None:
    """Found as a user downloads them: a Visium section without ``outs/`` (10x's download page: a prefixed
    matrix beside ``spatial/`` and the H&E, Space Ranger's own images left aside); HEST samples grouped by the
    patient their metadata names (``Patient 27`` made an id); legacy ST sections whose images share a prefix
    (``A1``, ``A10``) each with its own image."""
    from synthetic import counts_for, write_hest

    root = tmp_path / "study"
    xy = spot_grid(4, 4, 80, (200, 200))
    write_space_ranger(root / "V7", xy, np.ones((16, 3), int), ["a", "b", "c"], 60.0, prefix="V7_")
    for name in ("spatial/tissue_hires_image.png", "V7_image.tif"):
        Image.fromarray(tissue_image(600, 600)).save(root / "V7" / name)
    for f in (root / "V7" / "spatial").glob("V7_*"):
        f.rename(f.with_name(f.name.removeprefix("V7_")))  # spatial/ as the tarball unpacks: names unprefixed
    (root / "V7" / "filtered_feature_bc_matrix").mkdir()  # the .h5's matrix as a folder too: one section
    genes = ["a", "b", "c"]
    for sid, patient in (("NCBI1", "Patient 27"), ("NCBI2", "Patient 27"), ("NCBI3", float("nan"))):
        write_hest(root / "hest", sid, tissue_image(400, 400), 0.5, xy, counts_for(xy, genes), genes, patient=patient)
    st = root / "st"
    for sid, seed in (("A1", 1), ("A10", 2)):
        files = write_st_section(tmp_path / sid, seed=seed)
        st.mkdir(exist_ok=True)
        for kind, f in files.items():
            f.rename(st / f"{sid}_{f.name}" if kind != "image" else st / f"{sid}.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", He2stWarning)
        found = {s["sample_id"]: s for s in discover_sources(root)}
    assert found["V7"]["reader"] == "visium" and str(found["V7"]["image"]).endswith("V7_image.tif")
    assert str(found["A1"]["image"]).endswith("A1.jpg") and str(found["A10"]["image"]).endswith("A10.jpg")
    with pytest.warns(He2stWarning, match=r"no patient for 4 sample\(s\)"):
        patients = {s["sample_id"]: s["patient_id"] for s in with_default_patients(list(found.values()), root)}
    assert patients["NCBI1"] == patients["NCBI2"] == "Patient_27" and patients["NCBI3"] == "NCBI3"
    sheet_row = [{"sample_id": "NCBI2", "reader": "hest", "path": str(root / "hest")}]  # a sheet's empty patient
    assert with_default_patients(sheet_row, root)[0]["patient_id"] == "Patient_27"
    meta = root / "hest" / "metadata" / "NCBI3.json"
    meta.write_text(meta.read_text().replace("NaN", '"../P 9"'))  # no safe id: refused, not left out
    with pytest.raises(He2stError, match=r"NCBI3.json: patient id of sample NCBI3"):
        with_default_patients(discover_sources(root), root)
    from he2st.data.readers import read_source

    sample = read_source(found["V7"] | {"patient_id": "P"})
    assert sample.n_spots == 16


def test_hest_metadata_without_a_spot_diameter_or_with_a_spaced_patient_reads(tmp_path: Path) -> None:
    """HEST's Xenium rows leave ``spot_diameter`` empty (NaN in the JSON) and its table writes patients as
    ``Patient 1``: the default spot diameter and a cleaned patient id, not NaN in the saved sample or a refusal."""
    import json

    from synthetic import counts_for, write_hest

    from he2st.data.readers.hest import read_hest

    xy = spot_grid(3, 3, 80, (100, 100))
    write_hest(tmp_path, "TENX9", tissue_image(400, 400), 0.5, xy, counts_for(xy, ["a", "b"]), ["a", "b"],
               patient="Patient 1")
    meta = tmp_path / "metadata" / "TENX9.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"spot_diameter": float("nan")}))
    sample = read_hest(tmp_path, "TENX9")
    assert sample.patient_id == "Patient_1" and sample.spot_diameter_um == 55.0
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"pixel_size_um_estimated": float("nan"),
                                                               "pixel_size_um_embedded": 0.25}))
    assert read_hest(tmp_path, "TENX9").pixel_size_um == 0.25
