"""scverse-native outputs: predicted and prepared ``.h5ad`` files plot with squidpy as they are, and the
SpatialData store can hold the whole slide at full resolution, read tile by tile.

One synthetic pyramidal slide predicted once (the tiny ViT and kNN model of test_predict_wsi.py, a 200 µm
grid: a few dozen spots) and one prepared synthetic legacy-ST section keep this module to seconds.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image
from synthetic import tissue_image, write_pyramid, write_st_section
from test_predict_wsi import MPP, encoder, model_path  # noqa: F401 - the module's fixtures, reused

from he2st.data.slide import Slide, open_slide
from he2st.predict import PredictConfig, sdata
from he2st.workflows.config import PrepareConfig, load_config
from he2st.workflows.predict_slide import predict_slide
from he2st.workflows.prepare import prepare

WIDTH, HEIGHT = 2600, 2200  # px at MPP: more than one TILE_PX block across and down


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slide") / "wide.tif", tissue_image(HEIGHT, WIDTH, seed=5), MPP)


@pytest.fixture(scope="module")
def prediction(model_path, big_slide, encoder, tmp_path_factory) -> Path:  # noqa: F811 - fixtures by name
    return predict_slide(model_path, big_slide, tmp_path_factory.mktemp("pred"), pitch_um=200, encoder=encoder,
                         runtime="torch")  # no encoder graph to export: seconds saved


@pytest.fixture(scope="module")
def prepared_sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    files = write_st_section(root / "raw" / "S1", pitch_px=200, genes=[f"G{i}" for i in range(10)], seed=0)
    source = {"reader": "st", "sample_id": "S1", "patient_id": "P1", "path": files["counts"],
              "spots_file": files["spots"], "image": files["image"]}
    prepare(PrepareConfig(work_dir=root / "work", data={"dataset": None, "samples": [source]}))
    return root / "work" / "samples" / "S1.h5ad"


@pytest.mark.parametrize("which", ["prediction", "prepared_sample"])
def test_predicted_and_prepared_h5ad_plot_with_squidpy(which, request):
    """squidpy.pl.spatial_scatter draws the file as written: the hires H&E under circles at obsm["spatial"] x
    tissue_hires_scalef, spot_diameter_fullres across, coloured by the gene's values."""
    sq = pytest.importorskip("squidpy")
    adata = ad.read_h5ad(request.getfixturevalue(which))
    (library_id, library), = adata.uns["spatial"].items()
    gene = adata.var_names[1]
    ax = sq.pl.spatial_scatter(adata, color=gene, library_id=library_id, return_ax=True)
    hires, factors = library["images"]["hires"], library["scalefactors"]
    assert [im.get_array().shape for im in ax.images] == [hires.shape]
    spots = ax.collections[0]
    centres = np.array([(p.vertices.min(axis=0) + p.vertices.max(axis=0)) / 2 for p in spots.get_paths()])
    np.testing.assert_allclose(centres, adata.obsm["spatial"] * factors["tissue_hires_scalef"], atol=0.5)
    widths = np.ptp(spots.get_paths()[0].vertices, axis=0)
    np.testing.assert_allclose(widths, factors["spot_diameter_fullres"] * factors["tissue_hires_scalef"], rtol=0.02)
    values = adata[:, gene].X
    np.testing.assert_allclose(np.asarray(spots.get_array(), float),
                               np.asarray(values.todense() if hasattr(values, "todense") else values).ravel(),
                               rtol=1e-5)


def test_zarr_image_full_is_the_slide_at_full_resolution_read_tile_by_tile(model_path, big_slide, encoder,  # noqa: F811
                                                                            prediction, monkeypatch):
    """`--set zarr_image=full`: images/he is the level-0 slide as a pyramid in µm, with the spots in the same
    coordinate system; every level is written from reads of about one tile each (no whole-slide array). The
    finished prediction is reused: only the store is made again when zarr_image changes."""
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.transformations import get_transformation

    assert load_config(PredictConfig, None, ["zarr_image=full"]).zarr_image == "full"
    store = prediction.with_suffix(".zarr")

    def predict(**image: str) -> Path:
        return predict_slide(model_path, big_slide, prediction.parent, pitch_um=200, encoder=encoder,
                             runtime="torch", format="zarr", **image)

    assert predict() == prediction
    hires = spatialdata.read_zarr(store)
    assert hires.images["he"]["scale0"]["image"].shape == (3, round(HEIGHT * 2000 / WIDTH), 2000)
    assert hires.tables["table"].uns["he2st"]["zarr_image"] == "hires"

    tile = 512
    monkeypatch.setattr(sdata, "TILE_PX", tile)  # several tiles across this small slide
    reads: list[tuple[int, int, int]] = []
    original = Slide.read_region

    def recorded(self, x, y, level, width, height):
        reads.append((level, width, height))
        return original(self, x, y, level, width, height)

    monkeypatch.setattr(Slide, "read_region", recorded)
    assert predict(zarr_image="full") == prediction
    monkeypatch.undo()
    assert max(w * h for _, w, h in reads) <= (2 * tile) ** 2 < WIDTH * HEIGHT / 5  # at most 2x shrunk per read
    assert {level for level, _, _ in reads} == {0, 1, 2}  # lower levels come from the slide's own pyramid
    full = spatialdata.read_zarr(store)
    he = full.images["he"]
    shapes = [he[f"scale{k}"]["image"].shape for k in range(len(he.children))]
    assert shapes == [(3, HEIGHT >> k, WIDTH >> k) for k in range(4)]  # halved down to about 256 px
    level0 = he["scale0"]["image"]
    assert level0.data.chunksize == (3, tile, tile)
    with open_slide(big_slide) as slide:
        np.testing.assert_array_equal(np.asarray(level0[:, 2000:2100, 2400:2600]).transpose(1, 2, 0),
                                      slide.read_region(2400, 2000, 0, 200, 100))
        level3 = np.asarray(he["scale3"]["image"]).transpose(1, 2, 0).astype(float)
        shrunk = np.asarray(Image.fromarray(slide.read_region(0, 0, 2, WIDTH // 4, HEIGHT // 4)).resize(
            level3.shape[1::-1], Image.Resampling.BOX)).astype(float)
        assert np.abs(level3 - shrunk).max() <= 1
    scale = get_transformation(he, to_coordinate_system="um").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(scale)[:2], [MPP, MPP])  # level-0 px -> µm
    spots = full.shapes["spots"]
    xy_um = np.column_stack([spots.geometry.x, spots.geometry.y])
    np.testing.assert_allclose(xy_um, ad.read_h5ad(prediction).obsm["spatial"] * MPP, rtol=1e-6)
    assert full.tables["table"].uns["he2st"]["zarr_image"] == "full"
    written = store.stat().st_mtime_ns
    predict(zarr_image="full")
    assert store.stat().st_mtime_ns == written  # the same image again: the store is current, left alone
