"""Bad input: one clear line naming the file and the problem, exit code != 0, no partial output."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from in_process import run_cli
from PIL import Image
from synthetic import tissue_image

GENES = ["GA", "GB", "GC"]


def write_st(folder: Path, n: int = 6, pitch: float = 100.0, origin: float = 80.0, counts: pd.DataFrame | None = None,
             selected: int = 1, image: bool = True, ids: list[str] | None = None) -> dict[str, Path]:
    """A tiny legacy-ST section (counts TSV, selection TSV, JPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    xs = np.arange(n) % 3 + 2
    ys = np.arange(n) // 3 + 2
    spot_ids = ids or [f"{x}x{y}" for x, y in zip(xs, ys, strict=True)]
    if counts is None:
        counts = pd.DataFrame(np.random.default_rng(0).poisson(5, (n, len(GENES))), index=spot_ids, columns=GENES)
    with gzip.open(folder / "cnts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    pd.DataFrame({"x": xs, "y": ys, "new_x": xs, "new_y": ys, "pixel_x": origin + (xs - 2) * pitch,
                  "pixel_y": origin + (ys - 2) * pitch, "selected": selected}).to_csv(
        folder / "sel.tsv", sep="\t", index=False)
    if image:
        Image.fromarray(tissue_image(400, 400)).save(folder / "he.jpg")
    return {"counts": folder / "cnts.tsv.gz", "spots": folder / "sel.tsv", "image": folder / "he.jpg"}


def prepare_with(tmp_path: Path, files: dict[str, Path]) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "data:\n  dataset: null\n  samples:\n"
        f"  - {{reader: st, sample_id: S1, patient_id: P1, path: '{files['counts']}', spots_file: '{files['spots']}',"
        f" image: '{files['image']}'}}\n"
        f"  - {{reader: st, sample_id: S2, patient_id: P2, path: '{files['counts']}', spots_file: '{files['spots']}',"
        f" image: '{files['image']}'}}\n"
        "patch: {field_um: 50, size_px: 32}\n"
    )
    return run_cli("prepare", "-c", str(cfg), "-w", str(tmp_path / "work"))


def assert_clean_failure(result: subprocess.CompletedProcess, tmp_path: Path, file: Path, words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(file) in lines[0] and words in lines[0], lines[0]
    leftovers = [p for p in (tmp_path / "work").rglob("*") if p.is_file()] if (tmp_path / "work").exists() else []
    assert not [p for p in leftovers if p.suffix in (".h5", ".part") or ".part" in p.name], leftovers


def test_valid_tiny_st_sample_prepares(tmp_path):
    result = prepare_with(tmp_path, write_st(tmp_path / "in"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "work" / "patches" / "S1__50um_32px.h5").exists()


def test_missing_image(tmp_path):
    files = write_st(tmp_path / "in", image=False)
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["image"], "not found")


def test_image_that_is_not_an_image(tmp_path):
    files = write_st(tmp_path / "in", image=False)
    files["image"].write_bytes(b"this is a text file, not a JPEG\n" * 10)
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["image"], "not a readable image")


def test_truncated_image(tmp_path):
    files = write_st(tmp_path / "in")
    data = files["image"].read_bytes()
    files["image"].write_bytes(data[: len(data) // 3])
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["image"], "truncated or corrupt")


def test_nan_count_in_an_h5ad_is_refused_at_prepare(tmp_path):
    import anndata as ad

    values = np.ones((4, 3), np.float32)
    values[2, 1] = np.nan
    adata = ad.AnnData(X=values, obs=pd.DataFrame(index=["a", "b", "c", "d"]), var=pd.DataFrame(index=GENES))
    adata.obsm["spatial"] = np.array([[50.0, 50.0], [150.0, 50.0], [50.0, 150.0], [150.0, 150.0]])
    adata.write_h5ad(tmp_path / "x.h5ad")
    Image.fromarray(tissue_image(300, 300)).save(tmp_path / "he.png")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  dataset: null\n  samples:\n"
                   f"  - {{reader: h5ad, sample_id: S1, path: '{tmp_path / 'x.h5ad'}', image: '{tmp_path / 'he.png'}',"
                   " pixel_size_um: 1.0}\n")
    result = run_cli("prepare", "-c", str(cfg), "-w", str(tmp_path / "work"))
    assert_clean_failure(result, tmp_path, tmp_path / "x.h5ad", "count nan for gene 'GB' at spot 'c'")


def test_no_barcode_in_common(tmp_path):
    files = write_st(tmp_path / "in", ids=[f"{i}x99" for i in range(6)])
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["counts"], "no spot barcode in common")


def test_spots_off_the_image(tmp_path):
    files = write_st(tmp_path / "in", pitch=300.0)
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["image"], "lie off the 400x400 image")


def test_duplicate_barcodes(tmp_path):
    files = write_st(tmp_path / "in", ids=["2x2", "3x2", "2x2", "2x3", "3x3", "4x3"])
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["counts"], "duplicate spot barcode '2x2'")


def test_non_numeric_counts(tmp_path):
    counts = pd.DataFrame({"GA": [1, 2, 3, 4, 5, 6], "GB": [1, 2, "x7", 4, 5, 6], "GC": [0] * 6},
                          index=["2x2", "3x2", "4x2", "2x3", "3x3", "4x3"])
    files = write_st(tmp_path / "in", counts=counts)
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["counts"], "non-numeric count 'x7'")


def test_empty_after_tissue_filtering(tmp_path):
    files = write_st(tmp_path / "in", selected=0)
    assert_clean_failure(prepare_with(tmp_path, files), tmp_path, files["spots"], "no spot left")


def test_bad_config_value(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("patch: {field_um: -3}\n")
    r = run_cli("prepare", "-c", str(cfg))
    assert r.returncode == 2 and "patch.field_um" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["A1"])
def test_unknown_gene_in_panel_is_refused(her2st, name):
    from he2st.data.genes import GenePanel
    from he2st.data.her2st import load_section
    from he2st.errors import He2stError

    panel = GenePanel(genes=["ERBB2", "NOT_A_GENE_XYZ"])
    with pytest.raises(He2stError, match="NOT_A_GENE_XYZ"):
        panel.targets(load_section(name, her2st).adata)


@pytest.mark.parametrize("hostile", ["../../escaped", "a/b", ".hidden", "x\\\\y"])
def test_hostile_sample_id_in_a_config_writes_nothing_anywhere(tmp_path, hostile):
    files = write_st(tmp_path / "in")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "data:\n  dataset: null\n  samples:\n"
        f"  - {{reader: st, sample_id: '{hostile}', patient_id: P1, path: '{files['counts']}', "
        f"spots_file: '{files['spots']}', image: '{files['image']}'}}\n")
    result = run_cli("prepare", "-c", str(cfg), "-w", str(tmp_path / "deep" / "work"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not a safe name" in lines[0], result.stderr
    assert not (tmp_path / "deep").exists() and not list(tmp_path.rglob("*escaped*"))


def test_hostile_ids_from_metadata_or_run_names_cannot_leave_the_work_folder(tmp_path):
    from he2st.data.patches import PatchSpec
    from he2st.data.workspace import Workspace
    from he2st.errors import He2stError
    from he2st.workflows.config import BenchmarkConfig, load_config

    ws = Workspace(tmp_path / "work")
    for path in (lambda: ws.sample_path("../x"), lambda: ws.patch_path("../../x", PatchSpec()),
                 lambda: ws.run_dir("../runs2")):
        with pytest.raises(He2stError, match="not a safe name"):
            path()
    with pytest.raises(He2stError, match="invalid setting name"):
        load_config(BenchmarkConfig, None, ["name=../../elsewhere"])


def test_hostile_patient_in_hest_metadata_writes_nothing(tmp_path):
    """Ids read from files (here HEST metadata's patient) are checked like ids typed in a config."""
    from synthetic import counts_for, spot_grid, write_hest

    xy = spot_grid(3, 3, 150, (250, 250))
    write_hest(tmp_path / "hest", "TENX0", tissue_image(800, 800), 0.5, xy, counts_for(xy, GENES), GENES,
               patient="../../escaped")
    cfg = tmp_path / "hest.yaml"
    cfg.write_text(f"data:\n  dataset: null\n  samples:\n  - {{reader: hest, sample_id: TENX0, path: '{tmp_path / 'hest'}'}}\n")
    result = run_cli("prepare", "-c", str(cfg), "-w", str(tmp_path / "deep" / "work"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "patient id of sample TENX0" in lines[0], result.stderr
    assert "not a safe name" in lines[0]
    assert not (tmp_path / "deep").exists() and not list(tmp_path.rglob("*escaped*"))


def test_a_section_without_an_image_is_refused_before_any_sample_is_written(tmp_path):
    """A Space Ranger outs/ with no H&E given and none bundled (an expression-only section) is refused in one
    line naming its counts file, before the valid section listed first is saved."""
    from synthetic import spot_grid, write_space_ranger

    files = write_st(tmp_path / "in")
    xy = spot_grid(3, 3, 80, (100, 100))
    outs = tmp_path / "V1" / "outs"
    write_space_ranger(outs, xy, np.ones((9, 3), int), GENES, 60.0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "data:\n  dataset: null\n  samples:\n"
        f"  - {{reader: st, sample_id: S1, path: '{files['counts']}', spots_file: '{files['spots']}',"
        f" image: '{files['image']}'}}\n"
        f"  - {{reader: visium, sample_id: V1, path: '{outs}'}}\n")
    result = run_cli("prepare", "-c", str(cfg), "-w", str(tmp_path / "work"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {outs / 'filtered_feature_bc_matrix.h5'}: sample V1 has no image"), lines[0]
    assert not (tmp_path / "work").exists()


def test_hostile_library_id_is_refused_before_anything_is_read(tmp_path):
    result = run_cli("predict", "--model", str(tmp_path / "missing.pt"), "--slide", str(tmp_path / "s.tif"),
                      "--library-id", "../../escaped", "--out", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "library id" in lines[0] and "not a safe name" in lines[0]
    assert not (tmp_path / "out").exists()


def test_outputs_named_after_a_slide_get_a_safe_name():
    from he2st.io import name_from_stem, safe_name

    for stem in ["TCGA-A1 (copy)", "..hidden", "slide#1", ""]:
        assert safe_name(name_from_stem(stem)) == name_from_stem(stem)


def test_duplicate_gene_names_are_made_unique_with_a_warning_naming_the_file(tmp_path):
    from he2st.data.readers.st import read_st
    from he2st.errors import He2stWarning

    counts = pd.DataFrame(np.ones((6, 3), int), index=[f"{x}x{y}" for y in (2, 3) for x in (2, 3, 4)],
                          columns=["GA", "GB", "GA"])
    files = write_st(tmp_path, counts=counts)
    with pytest.warns(He2stWarning, match=r"cnts\.tsv\.gz: duplicate gene name\(s\) GA made unique"):
        sample = read_st(files["counts"], files["spots"], files["image"], sample_id="S1", patient_id="P1")
    assert list(sample.adata.var_names) == ["GA", "GB", "GA-1"]


def test_one_resolution_rule_warns_in_prepare_and_info_prints_the_upsampling(tmp_path):
    """A section at 2 µm/px is upsampled 4x by the default 112 µm / 224 px patches: prepare says so in
    one warning line (predict refuses such a slide), `he2st info` prints the factor."""
    files = write_st(tmp_path / "in", n=9)  # 100 px per 200 µm array step: 2 µm/px
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "data:\n  dataset: null\n  samples:\n"
        + "".join(f"  - {{reader: st, sample_id: {sid}, patient_id: P{sid}, path: '{files['counts']}', "
                  f"spots_file: '{files['spots']}', image: '{files['image']}'}}\n" for sid in ("S1", "S2"))
        + "context_field: false\n")
    work = tmp_path / "work"
    result = run_cli("prepare", "-c", str(cfg), "-w", str(work))
    warnings_ = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert result.returncode == 0 and len(warnings_) == 2, result.stderr
    assert "sample S1" in warnings_[0] and "upsampled 4.0x" in warnings_[0] and "sample S2" in warnings_[1]
    info = run_cli("info", "S1", "-w", str(work))
    assert info.returncode == 0 and "upsampling: 4.00x for 112um_224px patches (too coarse" in info.stdout


def test_a_single_sample_prepares_with_a_note_instead_of_folds(tmp_path):
    files = write_st(tmp_path / "in", n=9)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  dataset: null\n  samples:\n"
                   f"  - {{reader: st, sample_id: S1, patient_id: P1, path: '{files['counts']}', "
                   f"spots_file: '{files['spots']}', image: '{files['image']}'}}\ncontext_field: false\n")
    result = run_cli("prepare", "-c", str(cfg), "-w", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    assert "prepared 1 samples (S1)" in result.stdout and "note: one patient only: no lopo folds" in result.stdout
    assert (tmp_path / "work" / "samples" / "S1.h5ad").exists() and not (tmp_path / "work" / "folds").exists()


def test_cli_prints_its_version():
    from he2st.version import __version__

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"he2st {__version__}"


def _prediction_file(path: Path, n: int = 20, spatial: bool = True) -> Path:
    """A small prediction as `he2st predict` writes one (uns['he2st'] names the target transform)."""
    import anndata as ad

    adata = ad.AnnData(X=np.random.default_rng(0).gamma(2.0, 0.5, (n, 3)).astype(np.float32),
                       var=pd.DataFrame(index=["CXCL13", "CCL19", "EPCAM"]))
    if spatial:
        adata.obsm["spatial"] = np.stack(np.meshgrid(np.arange(5), np.arange(n // 5)), -1).reshape(-1, 2) * 100.0
    adata.uns["he2st"] = {"target_transform": "log1p_cp10k"}
    adata.write_h5ad(path)
    return path


def test_a_prediction_where_a_map_or_a_sample_is_read_is_one_line(tmp_path):
    """A prediction given as a measured sample, one without spot centres or without spots, and a threshold that
    is not a number: one line naming the file, exit 2, nothing written."""
    pred = _prediction_file(tmp_path / "p.h5ad")
    result = run_cli("info", pred)
    assert result.returncode == 2 and "p.h5ad: a prediction, not a measured sample" in result.stderr, result.stderr
    for name, kwargs, words in (("nospatial", {"spatial": False}, "no finite (x, y) spot centres"),
                                ("empty", {"n": 0}, "holds 0 spot(s) and 3 gene(s)")):
        path = _prediction_file(tmp_path / f"{name}.h5ad", **kwargs)
        for command in ("tls", "localize"):
            signature = ["--signature", "chemokine-12"] if command == "tls" else []
            result = run_cli(command, path, "--force", *signature, "--out", tmp_path / "out")
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and f"{name}.h5ad: {words}" in lines[0], result.stderr
    result = run_cli("localize", pred, "--force", "--threshold", "nan", "--out", tmp_path / "out")
    assert result.returncode == 2 and "threshold must be a finite number, got nan" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("value", "words"), [('"big"', "spot_diameter_fullres is 'big', not a positive number"),
                                              ("-5", "spot_diameter_fullres is -5, not a positive number")])
def test_visium_scale_factors_that_are_not_a_positive_number_are_named(tmp_path, value, words):
    import json

    from synthetic import spot_grid, write_space_ranger

    from he2st.data.readers import read_source
    from he2st.errors import He2stError

    outs = tmp_path / "V1" / "outs"
    write_space_ranger(outs, spot_grid(3, 3, 80, (100, 100)), np.ones((9, 3), int), GENES, 60.0)
    factors = outs / "spatial" / "scalefactors_json.json"
    factors.write_text(json.dumps(json.loads(factors.read_text()) | {"spot_diameter_fullres": json.loads(value)}))
    Image.fromarray(tissue_image(400, 400)).save(tmp_path / "he.png")
    with pytest.raises(He2stError, match=words) as caught:
        read_source({"reader": "visium", "sample_id": "V1", "path": str(outs), "image": str(tmp_path / "he.png")})
    assert "scalefactors_json.json" in str(caught.value)


@pytest.mark.parametrize("setting", ["method_options.ridge.alpha=-1", "method_options.ridge.alphas=[]",
                                     "method_options.mlp.hidden=[0]", "method_options.mlp.hidden=[-1]"])
def test_method_options_out_of_range_are_refused_before_any_fit(setting):
    """A negative ridge penalty, no alpha to choose from, a layer of no width: refused as the settings are
    read (they crashed the fit, or saved a model that cannot predict)."""
    from he2st.errors import He2stError
    from he2st.workflows.config import BenchmarkConfig, load_config

    with pytest.raises(He2stError, match=setting.split("=")[0].split(".")[-1]):
        load_config(BenchmarkConfig, None, [setting])


def test_an_image_found_damaged_part_way_leaves_no_sample_of_the_run(tmp_path):
    """A truncated JPEG is found only when patches are cut from it, after the sections before it were saved:
    the samples and patch files this run added go again, and the sample sheet is not written; a foreign file
    where a sample goes is refused before anything is written."""
    from he2st.data.samplesheet import write_samplesheet

    good = write_st(tmp_path / "good")
    bad = write_st(tmp_path / "bad")
    bad["image"].write_bytes(bad["image"].read_bytes()[:600])  # the header reads; the pixels end early
    sheet = write_samplesheet(tmp_path / "sheet.csv", [
        {"sample_id": "S1", "patient_id": "P1", "reader": "st", "path": good["counts"], "spots_file": good["spots"],
         "image": good["image"]},
        {"sample_id": "S2", "patient_id": "P2", "reader": "st", "path": bad["counts"], "spots_file": bad["spots"],
         "image": bad["image"]}])
    work = tmp_path / "work"
    result = run_cli("prepare", "--samplesheet", sheet, "-w", work, "--set", "patch.field_um=50",
                     "--set", "patch.size_px=32")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "he.jpg" in result.stderr
    assert not [p for p in work.rglob("*") if p.is_file() and p.name != ".he2st-output"], list(work.rglob("*"))
    bad["image"].write_bytes(good["image"].read_bytes())
    foreign = tmp_path / "w2" / "samples" / "S2.h5ad"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    result = run_cli("prepare", "--samplesheet", sheet, "-w", tmp_path / "w2")
    assert result.returncode == 2 and "S2.h5ad" in result.stderr and "not written by he2st" in result.stderr
    assert sorted(p.name for p in (tmp_path / "w2").rglob("*") if p.is_file()) == ["S2.h5ad"]
