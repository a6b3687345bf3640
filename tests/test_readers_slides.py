"""Readers on synthetic Space Ranger / HEST / h5ad inputs, and the slide backends on a pyramidal TIFF."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from synthetic import (
    HIRES_SCALEF,
    counts_for,
    spot_grid,
    tissue_image,
    write_hest,
    write_pyramid,
    write_space_ranger,
)

from he2st.data.readers import read_source
from he2st.data.readers.h5ad import read_h5ad_sample
from he2st.data.readers.hest import read_hest
from he2st.data.readers.st import read_st
from he2st.data.readers.visium import read_visium
from he2st.data.slide import PlainImageSlide, TiffFileSlide, open_slide, read_patch
from he2st.errors import He2stError

GENES = [f"G{i}" for i in range(12)]


@pytest.fixture()
def pyramid(tmp_path):
    img = tissue_image(1200, 1500, seed=1)
    return write_pyramid(tmp_path / "slide.tif", img, mpp=0.5), img


def test_openslide_and_tifffile_read_the_same_pixels(pyramid):
    path, img = pyramid
    from he2st.data.slide import OpenSlideSlide

    osr, tff = OpenSlideSlide(path), TiffFileSlide(path)
    assert osr.level_count == tff.level_count == 3
    assert osr.dimensions == tff.dimensions == (1500, 1200)
    assert tff.embedded_mpp == pytest.approx(0.5) and osr.embedded_mpp == pytest.approx(0.5)
    a = osr.read_region(300, 200, 0, 400, 300).astype(int)
    b = tff.read_region(300, 200, 0, 400, 300).astype(int)
    assert np.abs(a - b).mean() < 1.0  # same JPEG tiles, decoded by two libraries
    assert np.abs(b - img[200:500, 300:700]).mean() < 6  # lossy JPEG vs source
    # reads crossing the edge are padded with white
    edge = tff.read_region(1400, 1100, 0, 200, 200)
    assert (edge[150:, :] == 255).all() and (edge[:, 150:] == 255).all()
    assert isinstance(open_slide(path), TiffFileSlide)


def test_read_patch_uses_pyramid_level_and_physical_size(pyramid):
    path, _ = pyramid
    slide = open_slide(path)
    assert slide.best_level(4.0) == 2 and slide.best_level(1.5) == 0
    patch = read_patch(slide, (750, 600), side_level0_px=448, out_px=112)  # reads level 2 (ds 4)
    assert patch.shape == (112, 112, 3) and patch.mean() < 230


def test_a_slide_without_a_pyramid_is_thumbnailed_band_by_band(tmp_path, monkeypatch):
    """A tiled TIFF of one level is shrunk as it is read, never decoded whole (a 40,000 px side would be
    gigabytes), and the bands give the thumbnail of a whole decode."""
    import tifffile

    from he2st.data import slide as slide_module

    img = tissue_image(640, 480, seed=3)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64))
    whole, scale = TiffFileSlide(path).thumbnail(96)
    monkeypatch.setattr(slide_module, "THUMBNAIL_BAND_PIXELS", 480 * 50)  # 50 rows at a time
    heights = []
    tiff = TiffFileSlide(path)
    decode = tiff._decoded
    monkeypatch.setattr(tiff, "_decoded", lambda *a: heights.append(a[4]) or decode(*a))
    banded, banded_scale = tiff.thumbnail(96)
    assert banded.shape == whole.shape == (96, 72, 3) and banded_scale == scale
    assert max(heights) <= 50 and sum(heights) == 640
    assert np.abs(banded.astype(int) - whole.astype(int)).mean() < 2.0


def test_a_cmyk_tiff_is_refused_rather_than_read_as_rgb(tmp_path):
    """A CMYK TIFF has four 8-bit samples like RGBA; its first three are cyan, magenta and yellow, which read
    as RGB would give the encoder an inverted, wrong-coloured slide."""
    import tifffile

    path = tmp_path / "print.tif"
    tifffile.imwrite(path, 255 - tissue_image(64, 64).repeat(2, axis=2)[..., :4], photometric="separated",
                     tile=(32, 32))
    with pytest.raises(He2stError, match=r"print\.tif: expected an RGB TIFF, got CMYK \(separated\) colour"):
        open_slide(path)


def test_plain_jpeg_large_image_does_not_change_pillow_limit(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "big.jpg"
    Image.fromarray(tissue_image(300, 400)).save(path)
    slide = open_slide(path)
    assert isinstance(slide, PlainImageSlide) and slide.dimensions == (400, 300)
    thumb, scale = slide.thumbnail(100)
    assert thumb.shape[1] == 100 and scale == pytest.approx(0.25)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize(("positions", "header", "mtx"), [
    ("tissue_positions.csv", True, False), ("tissue_positions_list.csv", False, False),
    ("tissue_positions_list.csv", True, True),
])
def test_space_ranger_reader(tmp_path, pyramid, positions, header, mtx):
    path, _ = pyramid
    xy = spot_grid(4, 5, 200, (300, 250))
    counts = counts_for(xy, GENES)
    in_tissue = np.ones(len(xy), dtype=int)
    in_tissue[:3] = 0
    barcodes = write_space_ranger(tmp_path / "outs", xy, counts, GENES, spot_diameter_px=110.0,
                                  positions=positions, header=header, mtx=mtx, in_tissue=in_tissue)
    sample = read_visium(tmp_path / "outs", path, sample_id="V1", patient_id="P9")
    assert sample.n_spots == 17 and list(sample.adata.obs_names) == barcodes[3:]
    assert sample.pixel_size_um == pytest.approx(65 / 110)
    np.testing.assert_allclose(sample.spatial, xy[3:])
    np.testing.assert_array_equal(sample.adata.X.toarray(), counts[3:])
    assert sample.patient_id == "P9" and sample.technology == "visium"


@pytest.mark.parametrize("mtx", [False, True], ids=["h5", "mtx"])
@pytest.mark.parametrize(("positions", "header"), [("tissue_positions.csv", True), ("tissue_positions_list.csv", False)],
                         ids=["positions-2.0", "positions-1.x"])
@pytest.mark.parametrize("geo", [False, True], ids=["outs", "geo"])
def test_visium_as_published_lands_on_its_hires_image(tmp_path, geo, positions, header, mtx):
    """No full-resolution image: spots land on Space Ranger's hires image (full-resolution px x
    tissue_hires_scalef) and µm/px is 65 / spot_diameter_fullres / tissue_hires_scalef (the theoretical 65 µm spot) -- alike from an outs/
    folder and from GEO's loose files (sample prefix, gzipped), with either positions format and either matrix."""
    xy = spot_grid(4, 5, 180.0, (311.4, 257.8))  # full-resolution px of a 2400 x 2000 px section
    counts = counts_for(xy, GENES)
    in_tissue = np.ones(len(xy), dtype=int)
    in_tissue[:2] = 0
    folder = tmp_path / ("GSE1" if geo else "outs")
    barcodes = write_space_ranger(folder, xy, counts, GENES, spot_diameter_px=137.5, positions=positions,
                                  header=header, mtx=mtx, in_tissue=in_tissue, prefix="GSM1234_S1_" if geo else "",
                                  gz=geo, loose=geo, hires=tissue_image(240, 200, seed=3))
    sample = read_source({"reader": "visium", "sample_id": "S1", "path": folder})
    assert sample.image_path.name == ("GSM1234_S1_tissue_hires_image.png.gz" if geo else "tissue_hires_image.png")
    assert sample.slide.dimensions == (200, 240) and list(sample.adata.obs_names) == barcodes[2:]
    np.testing.assert_allclose(sample.spatial, xy[2:] * HIRES_SCALEF, atol=1.0)
    assert sample.pixel_size_um == pytest.approx(65 / 137.5 / HIRES_SCALEF, rel=0.01)
    np.testing.assert_array_equal(sample.adata.X.toarray(), counts[2:])
    assert read_patch(sample.slide, tuple(sample.spatial[0]), 16, 16).shape == (16, 16, 3)


def test_visium_falls_back_to_the_lowres_image_and_refuses_two_samples_in_one_folder(tmp_path):
    xy = spot_grid(3, 3, 300.0, (400.0, 400.0))
    folder = tmp_path / "GSE1"
    write_space_ranger(folder, xy, counts_for(xy, GENES), GENES, spot_diameter_px=100.0, prefix="GSM1_", gz=True,
                       loose=True)
    Image.fromarray(tissue_image(60, 60)).save(folder / "GSM1_tissue_lowres_image.png")  # 0.03 x 2000 px
    sample = read_source({"reader": "visium", "sample_id": "S1", "path": folder})
    assert sample.slide.dimensions == (60, 60) and sample.pixel_size_um == pytest.approx(65 / 100 / 0.03)
    np.testing.assert_allclose(sample.spatial, xy * 0.03)
    write_space_ranger(folder, xy, counts_for(xy, GENES), GENES, spot_diameter_px=100.0, prefix="GSM2_", gz=True,
                       loose=True)
    with pytest.raises(He2stError, match="several files could be filtered_feature_bc_matrix.h5") as err:
        read_source({"reader": "visium", "sample_id": "S1", "path": folder})
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_hest_reader_and_save_load_roundtrip(tmp_path):
    img = tissue_image(800, 800, seed=2)
    xy = spot_grid(3, 3, 150, (250, 250))
    write_hest(tmp_path, "TENX0", img, 0.5, xy, counts_for(xy, GENES), GENES, patient="PX")
    sample = read_hest(tmp_path, "TENX0")
    assert sample.pixel_size_um == 0.5 and sample.patient_id == "PX" and sample.slide.level_count == 3
    sample.save(tmp_path / "s.h5ad")
    from he2st.data.sample import Sample

    back = Sample.load(tmp_path / "s.h5ad")
    assert back.sample_id == "TENX0" and back.patient_id == "PX" and back.pixel_size_um == 0.5
    np.testing.assert_array_equal(back.adata.X.toarray(), sample.adata.X.toarray())
    assert back.slide.dimensions == (800, 800)


@pytest.mark.parametrize("patient", [float("nan"), None, ""])
def test_hest_sample_of_unknown_patient_is_its_own_patient(tmp_path, patient):
    """HEST's metadata say ``"patient": NaN`` where the patient is unknown: two such samples are two patients,
    not one patient 'nan' (which would put unrelated sections on the same side of every fold)."""
    img = tissue_image(400, 400, seed=2)
    xy = spot_grid(3, 3, 80, (100, 100))
    for sid in ("TENXA", "TENXB"):
        write_hest(tmp_path, sid, img, 0.5, xy, counts_for(xy, GENES), GENES, patient=patient)
    assert [read_hest(tmp_path, sid).patient_id for sid in ("TENXA", "TENXB")] == ["TENXA", "TENXB"]
    assert read_hest(tmp_path, "TENXA", patient_id="P7").patient_id == "P7"


def test_generic_h5ad_reader(tmp_path):
    import anndata as ad

    xy = spot_grid(2, 3, 50, (60, 60))
    adata = ad.AnnData(X=counts_for(xy, GENES).astype(np.float32))
    adata.obsm["spatial"] = xy
    adata.write_h5ad(tmp_path / "x.h5ad")
    Image.fromarray(tissue_image(300, 300)).save(tmp_path / "he.png")
    sample = read_h5ad_sample(tmp_path / "x.h5ad", tmp_path / "he.png", pixel_size_um=1.0, sample_id="S")
    assert sample.n_spots == 6 and sample.slide.dimensions == (300, 300)


def test_an_h5ad_keyed_by_ensembl_ids_names_its_genes_by_their_symbols(tmp_path):
    """CELLxGENE-style files key genes by Ensembl id and keep symbols in ``var['feature_name']``: signatures,
    markers and ``--genes`` are symbols, so the symbols name the genes (the ids kept in ``var['gene_ids']``);
    a missing symbol keeps its id, a shared one is made unique, and 'index' or another column can be chosen."""
    import anndata as ad

    xy = spot_grid(2, 3, 50, (60, 60))
    ids = [f"ENSG{i:011d}" for i in range(len(GENES))]
    symbols = ["CD79A", "MS4A1", None, "", "CXCL13", "CXCL13", *GENES[6:]]
    adata = ad.AnnData(X=counts_for(xy, GENES).astype(np.float32),
                       var=pd.DataFrame({"feature_name": symbols, "other": [f"o{i}" for i in range(len(GENES))]},
                                        index=ids))
    adata.obsm["spatial"] = xy
    adata.write_h5ad(tmp_path / "ens.h5ad")
    with pytest.warns(UserWarning, match=r"ens.h5ad: duplicate gene name\(s\) CXCL13"):
        sample = read_h5ad_sample(tmp_path / "ens.h5ad", None, pixel_size_um=1.0, sample_id="S")
    assert list(sample.adata.var_names[:6]) == ["CD79A", "MS4A1", ids[2], ids[3], "CXCL13", "CXCL13-1"]
    assert list(sample.adata.var["gene_ids"]) == ids
    assert list(read_h5ad_sample(tmp_path / "ens.h5ad", None, 1.0, sample_id="S",
                                 gene_names="index").adata.var_names) == ids
    source = read_source({"reader": "h5ad", "sample_id": "S", "path": str(tmp_path / "ens.h5ad"),
                          "pixel_size_um": 1.0, "gene_names": "other"})
    assert list(source.adata.var_names) == [f"o{i}" for i in range(len(GENES))]
    with pytest.raises(He2stError, match=r"ens.h5ad: gene_names: var has no column 'symbols' \(columns: feature_name"):
        read_h5ad_sample(tmp_path / "ens.h5ad", None, 1.0, sample_id="S", gene_names="symbols")
    # symbols already: var_names kept whatever columns the file has
    adata.var_names = [s or f"X{i}" for i, s in enumerate(symbols)]
    adata.var_names_make_unique()
    adata.write_h5ad(tmp_path / "sym.h5ad")
    named = read_h5ad_sample(tmp_path / "sym.h5ad", None, 1.0, sample_id="S").adata
    assert list(named.var_names) == list(adata.var_names) and "gene_ids" not in named.var


def test_h5ad_counts_come_from_the_counts_layer_and_fractional_counts_are_named(tmp_path):
    """A normalised ``X`` with the raw counts in ``layers['counts']`` (the scverse convention) gives the counts;
    a file with only normalised values is read with one warning naming it, since he2st would normalise them
    a second time."""
    import anndata as ad

    from he2st.errors import He2stWarning

    xy = spot_grid(2, 3, 50, (60, 60))
    counts = counts_for(xy, GENES).astype(np.float32)
    adata = ad.AnnData(X=np.log1p(counts), layers={"counts": counts})
    adata.obsm["spatial"] = xy
    adata.write_h5ad(tmp_path / "layer.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error", He2stWarning)
        sample = read_h5ad_sample(tmp_path / "layer.h5ad", None, pixel_size_um=1.0, sample_id="S")
    np.testing.assert_array_equal(sample.adata.X.toarray(), counts)
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    with pytest.warns(He2stWarning, match=r"normalised.h5ad: .* not whole numbers"):
        read_h5ad_sample(tmp_path / "normalised.h5ad", None, pixel_size_um=1.0, sample_id="S")


def test_h5ad_barcode_column_other_than_the_spot_ids_is_kept_as_barcode_original(tmp_path):
    """The spot ids are the saved sample's index, named ``barcode``; a ``barcode`` column with other values
    (10x barcodes beside other ids, as exported files often have) would clash with it when the sample is saved."""
    import anndata as ad

    from he2st.data.sample import Sample

    xy = spot_grid(2, 3, 50, (60, 60))
    adata = ad.AnnData(X=counts_for(xy, GENES).astype(np.float32),
                       obs=pd.DataFrame({"barcode": [f"AAAC-{i}" for i in range(6)], "region": list("aabbcc")},
                                        index=[f"spot{i}" for i in range(6)]))
    adata.obsm["spatial"] = xy
    adata.write_h5ad(tmp_path / "x.h5ad")
    sample = read_h5ad_sample(tmp_path / "x.h5ad", None, pixel_size_um=1.0, sample_id="S")
    back = Sample.load(sample.save(tmp_path / "S.h5ad"))
    assert list(back.adata.obs_names) == [f"spot{i}" for i in range(6)]
    assert list(back.adata.obs.columns) == ["barcode_original", "region"]
    assert list(back.adata.obs["barcode_original"]) == [f"AAAC-{i}" for i in range(6)]


def test_h5ad_annotations_with_missing_values_keep_their_dtype_and_save(tmp_path):
    """Annotations of an .h5ad often miss values (spots nobody labelled): a nullable boolean column with NA
    became an object column of True/False/NA, which the saved sample's .h5ad cannot store."""
    import anndata as ad

    from he2st.data.sample import Sample

    xy = spot_grid(2, 3, 50, (60, 60))
    adata = ad.AnnData(X=counts_for(xy, GENES).astype(np.float32),
                       obs=pd.DataFrame({"tumour": pd.array([True, None, False] * 2, dtype="boolean"),
                                         "depth": pd.array([1, None, 3] * 2, dtype="Int64"),
                                         "label": pd.Categorical(["a", None, "b"] * 2)},
                                        index=[f"spot{i}" for i in range(6)]))
    adata.obsm["spatial"] = xy
    adata.write_h5ad(tmp_path / "x.h5ad")
    sample = read_h5ad_sample(tmp_path / "x.h5ad", None, pixel_size_um=1.0, sample_id="S")
    obs = Sample.load(sample.save(tmp_path / "S.h5ad")).adata.obs
    assert {col: str(obs[col].dtype) for col in obs} == {"tumour": "boolean", "depth": "Int64", "label": "category"}
    assert obs["tumour"].isna().tolist() == [False, True, False] * 2 and obs["label"].tolist()[:2] == ["a", np.nan]


def test_h5ad_in_tissue_with_missing_values_is_refused_in_one_line(tmp_path):
    """A nullable ``in_tissue`` column with NA stopped on pandas' "cannot convert NA to integer", naming no file."""
    import anndata as ad

    xy = spot_grid(2, 3, 50, (60, 60))
    adata = ad.AnnData(X=counts_for(xy, GENES).astype(np.float32),
                       obs=pd.DataFrame({"in_tissue": pd.array([1, None, 1] * 2, dtype="Int64")},
                                        index=[f"spot{i}" for i in range(6)]))
    adata.obsm["spatial"] = xy
    adata.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(He2stError, match=r"x.h5ad.*in_tissue'\] has 2 missing value"):
        read_h5ad_sample(tmp_path / "x.h5ad", None, pixel_size_um=1.0, sample_id="S")


@pytest.mark.parametrize(("array", "pitch_um"), [("1k", 200.0), ("2k", 100.0)])
def test_legacy_st_array_and_its_pixel_size_come_from_the_spot_lattice(tmp_path, array, pitch_um):
    """The 2k array numbers positions in 100 µm steps and fills a checkerboard of them (141 µm diagonal
    spacing); the 1k array fills every 200 µm position. A slide at 0.5 µm/px must read as 0.5 either way."""
    mpp = 0.5
    grid = [(x, y) for y in range(2, 14) for x in range(2, 14) if array == "1k" or (x + y) % 2 == 0]
    xs, ys = np.array(grid).T
    rng = np.random.default_rng(0)
    step_px = pitch_um / mpp
    spots = pd.DataFrame({"x": xs, "y": ys, "new_x": xs + rng.normal(0, 0.02, len(xs)),
                          "new_y": ys + rng.normal(0, 0.02, len(xs)), "pixel_x": 40 + xs * step_px,
                          "pixel_y": 40 + ys * step_px, "selected": 1})
    spots.to_csv(tmp_path / "sel.tsv", sep="\t", index=False)
    ids = [f"{x}x{y}" for x, y in grid]
    pd.DataFrame(rng.poisson(3, (len(ids), 3)), index=ids, columns=GENES[:3]).to_csv(tmp_path / "cnts.tsv", sep="\t")
    sample = read_st(tmp_path / "cnts.tsv", tmp_path / "sel.tsv", None, "S1", "P1")
    assert sample.pixel_size_um == pytest.approx(mpp, rel=0.05)
    forced = read_st(tmp_path / "cnts.tsv", tmp_path / "sel.tsv", None, "S1", "P1", pitch_um=200.0)
    assert forced.pixel_size_um == pytest.approx(mpp * 200.0 / pitch_um, rel=0.05)  # the override is obeyed
    given = read_st(tmp_path / "cnts.tsv", tmp_path / "sel.tsv", None, "S1", "P1", pixel_size_um=0.25)
    assert given.pixel_size_um == 0.25


@pytest.mark.parametrize("writer", ["pandas", "R write.table"])
def test_legacy_st_counts_table_with_or_without_a_row_name_field_in_its_header(tmp_path, writer):
    """pandas writes an empty field above the spot ids; R's write.table writes no field there, so its header
    has one name per gene. Both read as the same genes and counts."""
    grid = [(x, y) for y in range(2, 6) for x in range(2, 6)]
    xs, ys = np.array(grid).T
    pd.DataFrame({"x": xs, "y": ys, "pixel_x": 40 + xs * 100.0, "pixel_y": 40 + ys * 100.0, "selected": 1}).to_csv(
        tmp_path / "sel.tsv", sep="\t", index=False)
    ids = [f"{x}x{y}" for x, y in grid]
    counts = pd.DataFrame(np.random.default_rng(0).poisson(3, (len(ids), 3)), index=ids, columns=GENES[:3])
    if writer == "pandas":
        counts.to_csv(tmp_path / "cnts.tsv", sep="\t")
    else:
        lines = ["\t".join(GENES[:3])] + ["\t".join([i, *map(str, row)]) for i, row in zip(ids, counts.to_numpy(),
                                                                                          strict=True)]
        (tmp_path / "cnts.tsv").write_text("\n".join(lines) + "\n")
    sample = read_st(tmp_path / "cnts.tsv", tmp_path / "sel.tsv", None, "S1", "P1")
    assert list(sample.adata.var_names) == GENES[:3] and list(sample.adata.obs_names) == ids
    np.testing.assert_array_equal(sample.adata.X.toarray(), counts.to_numpy())


def test_visium_hd_bins_are_summed_into_pseudo_spots(tmp_path):
    """8 µm bins on a 0.5 µm/px image (16 px per bin), summed into 56 µm pseudo-spots (7 x 7 bins): the
    counts are conserved, every kept pseudo-spot is at least half covered, centres sit on the 56 µm grid."""
    mpp, bin_um, side = 0.5, 8, 56.0
    n = 21  # 21 x 21 bins = 3 x 3 pseudo-spots
    gx, gy = np.meshgrid(np.arange(n), np.arange(n))
    xy = (np.column_stack([gx.ravel(), gy.ravel()]) + 0.5) * bin_um / mpp
    in_tissue = (gx.ravel() < 18).astype(int)  # the right column of pseudo-spots keeps 4 of its 7 bin columns
    counts = np.random.default_rng(0).poisson(2, (len(xy), len(GENES)))
    outs = tmp_path / "outs"
    folder = outs / "binned_outputs" / "square_008um"
    write_space_ranger(folder, xy, counts, GENES, spot_diameter_px=bin_um / mpp, positions="tissue_positions.parquet.csv",
                       in_tissue=in_tissue)
    positions = pd.read_csv(folder / "spatial" / "tissue_positions.parquet.csv")
    positions.to_parquet(folder / "spatial" / "tissue_positions.parquet")  # Visium HD ships parquet
    (folder / "spatial" / "tissue_positions.parquet.csv").unlink()
    sf = folder / "spatial" / "scalefactors_json.json"
    sf.write_text(sf.read_text().replace("{", f'{{"microns_per_pixel": {mpp}, "bin_size_um": {bin_um}, ', 1))
    sample = read_source({"reader": "visium_hd", "sample_id": "HD1", "path": outs, "pseudo_spot_um": side})
    assert sample.technology == "visium_hd" and sample.spot_diameter_um == side and sample.pixel_size_um == mpp
    kept = sample.adata.obs["n_bins"].to_numpy()
    assert sample.n_spots == 9 and (kept >= 0.5 * 49).all()  # the right column keeps 4 of 7 bin columns: 28 bins
    assert sorted(set(kept)) == [28, 49]
    in_spots = in_tissue.astype(bool)
    np.testing.assert_allclose(sample.adata.X.sum(), counts[in_spots].sum())
    np.testing.assert_allclose(np.unique(sample.spatial[:, 0]), (np.arange(3) + 0.5) * side / mpp)


@pytest.mark.parametrize("cell_level", [False, True])
def test_xenium_cells_placed_on_the_he_by_its_alignment(tmp_path, cell_level):
    """Cells at known H&E pixels (0.5 µm/px), stored in Xenium µm through an alignment matrix (H&E px ->
    morphology px at 0.2125 µm/px): read back at those pixels, with the H&E's µm/px from the matrix, as
    cells or summed into 55 µm pseudo-spots (counts conserved)."""
    import shutil

    mpp, morph = 0.5, 0.2125
    rng = np.random.default_rng(1)
    gx, gy = np.meshgrid(np.arange(12), np.arange(12))
    he_xy = np.column_stack([gx.ravel(), gy.ravel()]) * 30.0 + 15.0 + rng.uniform(-3, 3, (144, 2))  # 15 µm apart
    scale = mpp / morph
    matrix = np.array([[scale, 0.0, 100.0], [0.0, scale, 50.0], [0.0, 0.0, 1.0]])
    um = (matrix @ np.column_stack([he_xy, np.ones(len(he_xy))]).T).T[:, :2] * morph
    counts = rng.poisson(2, (len(he_xy), len(GENES)))
    ids = write_space_ranger(tmp_path / "sr", he_xy, counts, GENES, spot_diameter_px=10)
    folder = tmp_path / "xenium"
    folder.mkdir()
    shutil.copy(tmp_path / "sr" / "filtered_feature_bc_matrix.h5", folder / "cell_feature_matrix.h5")
    pd.DataFrame({"cell_id": ids, "x_centroid": um[:, 0], "y_centroid": um[:, 1], "cell_area": 60.0}).to_csv(
        folder / "cells.csv.gz", index=False)
    np.savetxt(tmp_path / "alignment.csv", matrix, delimiter=",")
    sample = read_source({"reader": "xenium", "sample_id": "X1", "path": folder, "cell_level": cell_level,
                          "alignment": tmp_path / "alignment.csv"})
    assert sample.technology == "xenium" and sample.pixel_size_um == pytest.approx(mpp)
    if cell_level:
        np.testing.assert_allclose(sample.spatial, he_xy, atol=1e-6)
        assert sample.n_spots == 144 and sample.spot_diameter_um == pytest.approx(2 * np.sqrt(60 / np.pi))
    else:
        side = 55.0 / mpp  # 110 px; the last row and column of squares catch a sliver of one cell each
        squares, which, per_square = np.unique(np.floor(he_xy / side).astype(int), axis=0, return_inverse=True,
                                               return_counts=True)
        kept = per_square >= 0.5 * np.median(per_square)
        assert sample.n_spots == kept.sum() == 9  # near-empty edge squares dropped
        np.testing.assert_allclose(sample.adata.X.sum(), counts[kept[which.ravel()]].sum())  # conserved where kept
        assert set(np.unique(sample.spatial)) <= set((np.arange(4) + 0.5) * side)


def test_vendor_slide_named_tif_goes_to_openslide(tmp_path):
    """An Aperio slide keeps its pyramid and pixel size (in the Aperio description, which tifffile does not
    read) whatever its name ends in: the suffix is not what decides the backend."""
    import tifffile

    from he2st.data.slide import OpenSlideSlide

    img = tissue_image(512, 512, seed=2)
    path = tmp_path / "aperio.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, photometric="rgb", tile=(256, 256), compression="jpeg", metadata=None,
                 description="Aperio Image Library v12.0.15 \r\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=70"
                             "|AppMag = 20|MPP = 0.4990")
        tw.write(img[::4, ::4].copy(), photometric="rgb", tile=(256, 256), compression="jpeg", metadata=None,
                 description="Aperio Image Library v12.0.15 \r\n128x128")
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert slide.level_dimensions == [(512, 512), (128, 128)]
        assert slide.embedded_mpp == pytest.approx(0.499)


@pytest.mark.parametrize("layout", ["strip", "ome", "ome-nm"])
def test_tiff_pixel_size_from_resolution_tags_or_ome_xml(tmp_path, layout):
    """A single-level strip TIFF keeps its XResolution (Pillow would drop it), and an OME-TIFF's
    PhysicalSizeX is read in its unit."""
    import tifffile

    img = tissue_image(300, 400, seed=2)
    path = tmp_path / "slide.tif"
    if layout == "strip":
        tifffile.imwrite(path, img, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    else:
        size, unit = (0.25, "µm") if layout == "ome" else (250.0, "nm")
        tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), ome=True,
                         metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit})
    with open_slide(path) as slide:
        assert isinstance(slide, TiffFileSlide) and slide.dimensions == (400, 300)
        assert slide.embedded_mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(10, 20, 0, 50, 40), img[20:60, 10:60])


@pytest.mark.parametrize("kind", ["png", "tiff", "tiff-tiled", "tiff-premultiplied"])
def test_transparent_pixels_read_as_white_background(tmp_path, kind):
    """Alpha is composited on white, as openslide's backend does: a transparent (black) strip is background,
    a half-transparent pixel is half way to white, opaque pixels are unchanged."""
    import tifffile

    rgb = tissue_image(64, 96, seed=4)
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, :20], alpha[:, 20:30] = 0, 128
    colour = rgb.copy()
    colour[:, :20] = 0  # what an editor leaves under a transparent area
    if kind == "tiff-premultiplied":
        colour = (colour.astype(np.uint16) * alpha[..., None] // 255).astype(np.uint8)
    rgba = np.dstack([colour, alpha])
    path = tmp_path / ("slide.png" if kind == "png" else "slide.tif")
    if kind == "png":
        Image.fromarray(rgba, "RGBA").save(path)
    else:
        tifffile.imwrite(path, rgba, photometric="rgb", tile=(32, 32) if kind == "tiff-tiled" else None,
                         extrasamples=["assocalpha" if kind == "tiff-premultiplied" else "unassalpha"])
    with open_slide(path) as slide:
        got = slide.read_region(0, 0, 0, 96, 64).astype(int)
    assert (got[:, :20] == 255).all()
    half = (rgb[:, 20:30].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(got[:, 20:30] - half).max() <= 1
    np.testing.assert_array_equal(got[:, 30:], rgb[:, 30:])


def test_unwritten_tile_of_a_sparse_tiff_reads_white(tmp_path):
    """A tile of byte count 0 (a sparse TIFF leaves empty background unwritten) is background, not corrupt."""
    import tifffile

    img = tissue_image(128, 128, seed=5)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["TileOffsets"].overwrite([0, *tif.pages[0].dataoffsets[1:]])
        tags["TileByteCounts"].overwrite([0, *tif.pages[0].databytecounts[1:]])
    with open_slide(path) as slide:
        got = slide.read_region(0, 0, 0, 128, 128)
    assert (got[:64, :64] == 255).all()
    np.testing.assert_array_equal(got[64:, 64:], img[64:, 64:])


@pytest.mark.parametrize("tile", [None, (32, 32)])
def test_planar_separate_rgb_tiff_reads_all_three_planes(tmp_path, tile):
    """Each sample's plane is its own run of tiles (or strips): all three are read, not the red one as gray."""
    import tifffile

    img = tissue_image(80, 100, seed=6)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate", tile=tile)
    with open_slide(path) as slide:
        assert isinstance(slide, TiffFileSlide)
        got = slide.read_region(0, 0, 0, 100, 80)
    np.testing.assert_array_equal(got, img)
    assert len({got[..., c].tobytes() for c in range(3)}) == 3  # the channels differ


def test_a_tiff_tifffile_refuses_is_not_handed_to_another_reader(tmp_path):
    """A 16-bit RGB TIFF is refused in one line naming the file and what it holds, not read some other way."""
    import tifffile

    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, tissue_image(64, 64).astype(np.uint16) * 257, photometric="rgb", tile=(32, 32))
    with pytest.raises(He2stError, match="expected an 8-bit RGB TIFF, got 3 sample.s. per pixel of uint16") as err:
        open_slide(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_patch_cache_is_cut_again_for_another_image_of_the_same_name_and_size(tmp_path):
    """An uncompressed TIFF re-exported under its name (another scan, a stain-normalised copy) keeps its byte
    size; its patches are cut from the new pixels, not taken from the cache of the old ones."""
    import tifffile

    from he2st.data.patches import PatchCache, PatchSpec, extract_patches
    from he2st.data.sample import Sample, build_adata

    image, xy = tmp_path / "he.tif", np.array([[100.0, 100.0], [300.0, 300.0]])
    spec = PatchSpec(field_um=56, size_px=112)

    def cut(grey: int) -> float:
        tifffile.imwrite(image, np.full((400, 400, 3), grey, np.uint8), photometric="rgb")
        sample = Sample("s", "p", build_adata(np.ones((2, 1)), ["a", "b"], ["g"], xy), 0.5, 55.0, image_path=image)
        try:
            return float(PatchCache(extract_patches(sample, spec, tmp_path)).read().mean())
        finally:
            sample.close()

    assert cut(200) == 200.0
    assert cut(30) == 30.0


@pytest.mark.parametrize("cut", ["one", "blocks"])
def test_a_patch_read_from_a_coarse_level_is_centred_on_its_spot(tmp_path, cut):
    """A patch read at a level of downsample 4 is centred on its spot to within a level-0 pixel on average:
    the corner goes to the nearest level pixel, not the one at or before it (which shifts every patch 1.5
    level-0 px towards the top left)."""
    from he2st.data.patches import read_patches

    img = np.full((2048, 2048, 3), 255, np.uint8)
    corners = np.array([[200 + 300 * i + i % 4, 200 + 300 * j + (j + 1) % 4] for i in range(6) for j in range(6)])
    for x, y in corners:
        img[y : y + 16, x : x + 16] = 0  # 16 px squares, centred on (x + 8, y + 8)
    slide = open_slide(write_pyramid(tmp_path / "slide.tif", img, mpp=0.25))
    centres = corners + 8.0
    assert slide.best_level(256 / 64) == 2
    patches = (read_patches(slide, centres, 256, 64) if cut == "blocks"
               else np.stack([read_patch(slide, tuple(c), 256, 64) for c in centres]))
    dark = 255.0 - patches[..., 0]
    ys, xs = np.mgrid[:64, :64]
    found = np.stack([(dark * xs).sum((1, 2)), (dark * ys).sum((1, 2))], axis=1) / dark.sum((1, 2))[:, None]
    offset = (found - 31.5) * 4  # level-0 px from the patch's centre
    assert np.abs(offset.mean(axis=0)).max() < 0.75
