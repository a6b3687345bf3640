"""Every path he2st writes stays inside the folder the user named, whatever the ids and columns it is built
from: ids read from a sample file's own metadata, a plain .h5ad's library id, a predict manifest's ``out``."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from in_process import run_cli
from synthetic import counts_for, spot_grid, tissue_image, write_pyramid, write_st_section
from test_predict_wsi import MPP, encoder, model_path  # noqa: F401 - the module's fixtures, reused

from he2st.data.readers.h5ad import read_h5ad_sample
from he2st.data.sample import Sample
from he2st.errors import He2stError
from he2st.io import inside

HOSTILE = "../../escaped"


def _nothing_escaped(root: Path) -> None:
    """No file or folder named after the hostile id, anywhere from two levels above ``root`` down."""
    assert not list(root.parent.parent.rglob("*escaped*"))


def test_inside_accepts_paths_under_the_folder_and_refuses_the_rest(tmp_path):
    root = tmp_path / "out"
    assert inside(root, root / "a" / "b.h5ad") == root / "a" / "b.h5ad"
    assert inside(root, root) == root
    for outside in (root / ".." / "x.h5ad", root / "a" / ".." / ".." / "x", tmp_path / "outer", Path("/etc/x")):
        with pytest.raises(He2stError, match="leaves the output folder") as caught:
            inside(root, outside)
        assert "\n" not in str(caught.value)
    (tmp_path / "elsewhere").mkdir()
    root.mkdir()
    os.symlink(tmp_path / "elsewhere", root / "linked")  # a subfolder the user linked to another disk
    assert inside(root, root / "linked" / "x.h5") == root / "linked" / "x.h5"


def test_hostile_ids_in_a_sample_files_own_metadata_are_refused_and_nothing_is_written(tmp_path,
                                                                                      model_path):  # noqa: F811
    """A prepared sample whose uns["he2st"] names it ../../escaped: `he2st predict --spots-from` would name
    its output after it; it exits 2 with one line naming the file, and writes nothing anywhere."""
    files = write_st_section(tmp_path / "raw", pitch_px=200, seed=0)
    good = Sample.load(_prepared(files, tmp_path / "work"))
    hostile = tmp_path / "hostile.h5ad"
    adata = ad.read_h5ad(tmp_path / "work" / "samples" / "S1.h5ad")
    adata.uns["he2st"]["sample_id"] = HOSTILE
    adata.write_h5ad(hostile)
    with pytest.raises(He2stError, match="sample id '../../escaped' is not a safe name") as caught:
        Sample.load(hostile)
    assert str(hostile) in str(caught.value)
    out = tmp_path / "deep" / "out"
    result = run_cli("predict", "--model", model_path, "--spots-from", hostile, "--out", out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not a safe name" in lines[0], result.stderr
    assert str(hostile) in lines[0] and not (tmp_path / "deep").exists()
    _nothing_escaped(out)
    adata.uns["he2st"]["sample_id"], adata.uns["he2st"]["patient_id"] = good.sample_id, HOSTILE
    adata.write_h5ad(hostile)
    with pytest.raises(He2stError, match="patient id '../../escaped' is not a safe name"):
        Sample.load(hostile)


def _prepared(files: dict[str, Path], work: Path) -> Path:
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.prepare import prepare

    source = {"reader": "st", "sample_id": "S1", "patient_id": "P1", "path": files["counts"],
              "spots_file": files["spots"], "image": files["image"]}
    prepare(PrepareConfig(work_dir=work, data={"dataset": None, "samples": [source]}))
    return work / "samples" / "S1.h5ad"


def test_a_plain_h5ad_is_named_by_its_own_library_id_which_is_checked(tmp_path):
    """Without a sample id, a scverse .h5ad is named by the one key of uns["spatial"]; a hostile one is refused
    in one line naming the file, and a sample id from the config is used instead when given."""
    genes = ["GA", "GB", "GC"]
    xy = spot_grid(3, 3, 100, (100, 100))
    adata = ad.AnnData(X=counts_for(xy, genes).astype(np.float32))
    adata.var_names = genes
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {"V1_Breast": {"scalefactors": {"spot_diameter_fullres": 80.0}}}
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    assert read_h5ad_sample(path, None, 1.0).sample_id == "V1_Breast"
    adata.uns["spatial"] = {HOSTILE: {"scalefactors": {"spot_diameter_fullres": 80.0}}}
    adata.write_h5ad(path)  # HDF5 splits the key on "/": it reads back as the library ".."
    with pytest.raises(He2stError, match=r"library id in uns\['spatial'\] '\.\.' is not a safe name") as err:
        read_h5ad_sample(path, None, 1.0)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    assert read_h5ad_sample(path, None, 1.0, sample_id="S9").sample_id == "S9"


def test_a_manifest_row_cannot_send_its_outputs_out_of_the_output_folder(tmp_path, model_path):  # noqa: F811
    """`out` in a predict manifest is a folder inside --out: `../../x` (or an absolute path elsewhere) exits 2
    with one line before any slide is read, and nothing is written."""
    slide = write_pyramid(tmp_path / "slide.tif", tissue_image(600, 600, seed=1), MPP)
    out = tmp_path / "deep" / "batch"
    for bad in ("../../escaped", str(tmp_path / "escaped")):
        manifest = tmp_path / "slides.csv"
        manifest.write_text(f"slide,out\n{slide.name},fine\n{slide.name},{bad}\n")
        result = run_cli("predict", "--model", model_path, "--manifest", manifest, "--out", out, "--mpp", MPP)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "manifest out of slide.tif" in lines[0] and "leaves the output folder" in lines[0]
        assert not (tmp_path / "deep").exists()
        _nothing_escaped(out)
