"""What every registered reader promises, checked for each of them (as timm tests every registered model).

Each reader has a factory here (``@reader_input("name")``) that writes a tiny valid input of its layout. Every
reader must give a :class:`Sample` whose spots lie on its image, with a positive pixel size, unique barcodes
and finite non-negative counts; it must refuse a NaN, infinite or negative count naming the file, the spot
and the gene, and a missing counts file in one line naming it. A reader without a factory fails the first test.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from synthetic import counts_for, spot_grid, tissue_image, write_hest, write_space_ranger

from he2st.data.readers import list_readers, read_source
from he2st.errors import He2stError

GENES = [f"G{i}" for i in range(6)]
BAD_SPOT, BAD_GENE = 1, 2  # where a bad count is written


@dataclass
class ReaderInput:
    source: dict  # what a configuration lists under data.samples
    counts_file: Path  # the file a bad count is written to, and removed to test a missing file
    barcodes: list[str]  # the spot id the reader gives each row of the written counts


Factory = Callable[[Path, float | None], ReaderInput]  # (folder to write in, one bad count to write or None)
INPUTS: dict[str, Factory] = {}


def reader_input(name: str) -> Callable[[Factory], Factory]:
    def register(factory: Factory) -> Factory:
        INPUTS[name] = factory
        return factory

    return register


def counts(n: int, bad: float | None) -> np.ndarray:
    """Counts of ``n`` spots, with ``bad`` at (``BAD_SPOT``, ``BAD_GENE``) when given."""
    values = counts_for(spot_grid(1, n, 1.0, (0.0, 0.0)), GENES).astype(np.float64)
    if bad is not None:
        values[BAD_SPOT, BAD_GENE] = bad
    return values


@reader_input("st")
def st_input(root: Path, bad: float | None) -> ReaderInput:
    values = counts(12, bad)
    grid = [(x, y) for y in range(2, 5) for x in range(2, 6)]  # 12 spots, 100 px per 200 µm array step
    ids = [f"{x}x{y}" for x, y in grid]
    pd.DataFrame(values, index=ids, columns=GENES).to_csv(root / "cnts.tsv", sep="\t")
    xs, ys = np.array(grid).T
    pd.DataFrame({"x": xs, "y": ys, "pixel_x": xs * 100.0, "pixel_y": ys * 100.0, "selected": 1}).to_csv(
        root / "sel.tsv", sep="\t", index=False)
    Image.fromarray(tissue_image(600, 700)).save(root / "he.jpg")
    return ReaderInput({"reader": "st", "sample_id": "S1", "path": root / "cnts.tsv", "spots_file": root / "sel.tsv",
                        "image": root / "he.jpg"}, root / "cnts.tsv", ids)


@reader_input("visium")
def visium_input(root: Path, bad: float | None) -> ReaderInput:
    values = counts(12, bad)
    xy = spot_grid(3, 4, 300.0, (400.0, 400.0))  # on the 220 x 220 px hires image of a 2200 px section
    barcodes = write_space_ranger(root / "outs", xy, values, GENES, spot_diameter_px=200.0,
                                  hires=tissue_image(220, 220))
    return ReaderInput({"reader": "visium", "sample_id": "S1", "path": root / "outs"},
                       root / "outs" / "filtered_feature_bc_matrix.h5", barcodes)


@reader_input("visium_hd")
def visium_hd_input(root: Path, bad: float | None) -> ReaderInput:
    values = counts(196, bad)
    gx, gy = np.meshgrid(np.arange(14), np.arange(14))  # 8 µm bins at 0.5 µm/px: 2 x 2 pseudo-spots of 55 µm
    xy = (np.column_stack([gx.ravel(), gy.ravel()]) + 0.5) * 16.0
    folder = root / "outs" / "binned_outputs" / "square_008um"
    barcodes = write_space_ranger(folder, xy, values, GENES, spot_diameter_px=16.0)
    factors = folder / "spatial" / "scalefactors_json.json"
    factors.write_text(factors.read_text().replace("{", '{"microns_per_pixel": 0.5, "bin_size_um": 8, ', 1))
    Image.fromarray(tissue_image(300, 300)).save(root / "he.png")
    return ReaderInput({"reader": "visium_hd", "sample_id": "S1", "path": root / "outs", "image": root / "he.png"},
                       folder / "filtered_feature_bc_matrix.h5", barcodes)


@reader_input("xenium")
def xenium_input(root: Path, bad: float | None) -> ReaderInput:
    values = counts(196, bad)
    gx, gy = np.meshgrid(np.arange(14), np.arange(14))  # cells 8 µm apart, H&E and morphology image at 0.5 µm/px
    um = (np.column_stack([gx.ravel(), gy.ravel()]) + 0.5) * 8.0
    ids = write_space_ranger(root / "sr", um, values, GENES, spot_diameter_px=10.0)
    folder = root / "xenium"
    folder.mkdir()
    shutil.copy(root / "sr" / "filtered_feature_bc_matrix.h5", folder / "cell_feature_matrix.h5")
    pd.DataFrame({"cell_id": ids, "x_centroid": um[:, 0], "y_centroid": um[:, 1]}).to_csv(folder / "cells.csv",
                                                                                         index=False)
    Image.fromarray(tissue_image(300, 300)).save(root / "he.png")
    return ReaderInput({"reader": "xenium", "sample_id": "S1", "path": folder, "image": root / "he.png",
                        "pixel_size_um": 0.5}, folder / "cell_feature_matrix.h5", ids)


def _anndata(values: np.ndarray, xy: np.ndarray) -> ad.AnnData:
    adata = ad.AnnData(X=values.astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=GENES))
    adata.obsm["spatial"] = xy
    return adata


@reader_input("h5ad")
def h5ad_input(root: Path, bad: float | None) -> ReaderInput:
    values = counts(12, bad)
    xy = spot_grid(3, 4, 60.0, (50.0, 50.0))
    _anndata(values, xy).write_h5ad(root / "x.h5ad")
    Image.fromarray(tissue_image(300, 300)).save(root / "he.png")
    return ReaderInput({"reader": "h5ad", "sample_id": "S1", "path": root / "x.h5ad", "image": root / "he.png",
                        "pixel_size_um": 1.0}, root / "x.h5ad", [f"s{i}" for i in range(12)])


@reader_input("hest")
def hest_input(root: Path, bad: float | None) -> ReaderInput:
    values = counts(12, bad)
    xy = spot_grid(3, 4, 60.0, (50.0, 50.0))
    write_hest(root, "TENX0", tissue_image(300, 300), 0.5, xy, values, GENES)
    return ReaderInput({"reader": "hest", "sample_id": "TENX0", "path": root}, root / "st" / "TENX0.h5ad",
                       [f"s{i}" for i in range(12)])


def written(name: str, root: Path, bad: float | None = None) -> ReaderInput:
    """The reader's tiny input under ``root``, with ``bad`` as one count when given."""
    if name not in INPUTS:
        pytest.fail(f"reader {name!r} has no input factory in {Path(__file__).name}")
    root.mkdir(parents=True, exist_ok=True)
    return INPUTS[name](root, bad)


def test_every_reader_has_an_input_factory():
    assert sorted(INPUTS) == list_readers(), "give each registered reader a @reader_input factory"


@pytest.mark.parametrize("name", list_readers())
def test_reads_a_valid_sample(name, tmp_path):
    sample = read_source(written(name, tmp_path).source)
    xy = sample.spatial
    width, height = sample.slide.dimensions
    assert sample.n_spots > 0 and xy.shape == (sample.n_spots, 2) and np.isfinite(xy).all()
    assert ((xy >= 0) & (xy < [width, height])).all(), "spots off the image"
    assert np.isfinite(sample.pixel_size_um) and sample.pixel_size_um > 0
    assert sample.spot_diameter_um > 0
    assert not sample.adata.obs_names.has_duplicates and list(sample.adata.var_names) == GENES
    values = sample.adata.X.toarray()
    assert np.issubdtype(values.dtype, np.number) and np.isfinite(values).all() and (values >= 0).all()
    assert values.sum() > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0], ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("name", list_readers())
def test_refuses_a_bad_count_naming_the_file_spot_and_gene(name, bad, tmp_path):
    given = written(name, tmp_path, bad)
    with pytest.raises(He2stError) as err:
        read_source(given.source)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(given.counts_file)), message
    assert repr(given.barcodes[BAD_SPOT]) in message and repr(GENES[BAD_GENE]) in message, message


@pytest.mark.parametrize("name", list_readers())
def test_refuses_a_missing_counts_file_in_one_line_naming_it(name, tmp_path):
    given = written(name, tmp_path)
    given.counts_file.unlink()
    with pytest.raises(He2stError) as err:
        read_source(given.source)
    message = str(err.value)
    names_it = str(given.counts_file) in message or (
        message.startswith(str(given.counts_file.parent)) and given.counts_file.name in message)
    assert "\n" not in message and names_it, message


def test_a_source_takes_only_its_own_readers_keys(tmp_path):
    """Each source is parsed into its reader's own options: another reader's key is refused in one line."""
    source = written("visium", tmp_path).source | {"pitch_um": 200.0}
    with pytest.raises(He2stError, match=r"^invalid sample source visium\.pitch_um=200\.0: Extra inputs"):
        read_source(source)
    with pytest.raises(He2stError, match="does not match any of the expected tags: 'h5ad', 'hest', 'st'"):
        read_source(source | {"reader": "visum"})
