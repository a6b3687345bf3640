"""Whole-slide prediction: tissue detection, spot grids, streamed/resumable prediction, maps and report.

Synthetic slides (pyramidal JPEG TIFFs from tests/synthetic.py) with a tiny random ViT and a kNN
model fitted on random features keep most tests to seconds; two tests use real her2st sections.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from synthetic import tissue_image, write_pyramid

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchSpec, read_patches
from he2st.data.slide import open_slide, read_patch
from he2st.data.spots import SpotSet
from he2st.encoders import create
from he2st.encoders.inference import PatchEmbedder
from he2st.errors import He2stError
from he2st.methods import ModelCard, create_method, load_method
from he2st.predict.grid import hex_grid
from he2st.predict.tissue import detect_tissue, load_mask
from he2st.workflows.predict_slide import predict_slide

MPP = 0.5
SIDE = 3000  # px: a 1.5 mm field with an elliptical tissue blob (~120 spots at 100 µm pitch)
GENES = [f"G{i}" for i in range(8)]


def _truth(h: int, w: int) -> np.ndarray:
    """The blob of ``tissue_image`` (defaults) at any resolution."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = 0.35 * min(h, w)
    return ((yy - 0.5 * h) / r) ** 2 + ((xx - 0.5 * w) / (1.2 * r)) ** 2 < 1


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("wsi") / "slide.tif", tissue_image(SIDE, SIDE, seed=3), MPP)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create("test_vit", pretrained=False)


@pytest.fixture(scope="module")
def model_path(encoder, tmp_path_factory) -> Path:
    """A kNN model over random 'training spots' whose features match the tiny encoder."""
    rng = np.random.default_rng(0)
    n = 80
    method = create_method("knn", top_k=5)
    method.card = ModelCard(method="knn", panel=GenePanel(genes=GENES), encoder=encoder.spec, patch=PatchSpec(),
                            embedding=EmbedConfig(encoder=encoder.spec.name))
    ids = np.array([f"b{i}" for i in range(n)], dtype=object)
    features = rng.normal(size=(n, encoder.embed_dim)).astype(np.float32)
    targets = rng.gamma(2, 1, (n, len(GENES))).astype(np.float32)
    method.fit(SpotSet(np.array(["T"] * n, dtype=object), ids, features, np.zeros((n, 2)), GENES, targets))
    return method.save(tmp_path_factory.mktemp("model") / "knn.pt")


@pytest.fixture(scope="module")
def reference(model_path, slide_path, encoder, tmp_path_factory) -> Path:
    """One uninterrupted prediction of the synthetic slide (several chunks)."""
    return predict_slide(model_path, slide_path, tmp_path_factory.mktemp("ref"), chunk=32, encoder=encoder)


# ---------------------------------------------------------------------------- tissue and grid
def test_tissue_mask_covers_tissue_not_background_or_pen(slide_path):
    with open_slide(slide_path) as slide:
        thumb, scale = slide.thumbnail(1000)
    truth = _truth(*thumb.shape[:2])
    mask = detect_tissue(thumb, MPP / scale)
    assert mask.shape == truth.shape
    assert mask[truth].mean() > 0.98 and mask[~truth].mean() < 0.01
    inked = thumb.copy()
    inked[30:45, 40:900] = (40, 160, 60)  # green pen line
    inked[940:955, 40:900] = (20, 40, 200)  # saturated blue pen line
    inked[960:975, 40:900] = (15, 15, 15)  # black marker
    mask = detect_tissue(inked, MPP / scale)
    assert not mask[30:45].any() and not mask[940:].any() and mask[truth].mean() > 0.98


def test_hex_grid_has_visium_pitch_and_stays_on_tissue():
    mask = np.zeros((400, 500), dtype=bool)
    mask[50:350, 60:440] = True
    scale, mpp, pitch = 0.1, 0.5, 100.0  # mask px per level-0 px; 100 µm = 200 level-0 px
    grid = hex_grid(mask, scale, pitch, mpp)
    xy = grid.xy
    mx, my = np.floor(xy[:, 0] * scale).astype(int), np.floor(xy[:, 1] * scale).astype(int)
    assert mask[my, mx].all() and len(grid) > 100
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(axis=1), pitch / mpp, rtol=1e-9)
    interior = (np.abs(d - pitch / mpp) < 1e-6).sum(axis=1)
    assert interior.max() == 6  # hexagonal: six nearest neighbours
    rows = np.unique(xy[:, 1])
    np.testing.assert_allclose(np.diff(rows), pitch / mpp * np.sqrt(3) / 2)
    assert ((grid.array_col - grid.array_row) % 2 == 0).all()  # Visium column parity
    assert grid.spot_diameter_um == pytest.approx(55.0) and len(set(grid.names)) == len(grid)


def test_block_reader_matches_read_patch(slide_path):
    rng = np.random.default_rng(1)
    xy = rng.uniform(-100, SIDE + 100, (40, 2))
    with open_slide(slide_path) as slide:
        for side, block in ((224, 2048), (500, 300)):
            expected = np.stack([read_patch(slide, tuple(p), side, 224) for p in xy])
            np.testing.assert_array_equal(read_patches(slide, xy, side, 224, block_px=block), expected)


# ---------------------------------------------------------------------------- prediction
def test_prediction_h5ad_layout(reference, model_path, slide_path, encoder):
    adata = ad.read_h5ad(reference)
    n = adata.n_obs
    assert 80 < n < 200 and adata.X.shape == (n, len(GENES)) and list(adata.var_names) == GENES
    assert np.isfinite(adata.X).all()
    xy = adata.obsm["spatial"]
    assert xy.shape == (n, 2) and _truth(SIDE, SIDE)[xy[:, 1].astype(int), xy[:, 0].astype(int)].all()
    assert (adata.obs["in_tissue"] == 1).all()
    assert {"best_similarity", "dispersion", "array_row", "array_col"} <= set(adata.obs.columns)
    lib = adata.uns["spatial"]["slide"]  # the layout squidpy.pl.spatial_scatter / scanpy.pl.spatial read
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and max(hires.shape[:2]) == 2000
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(2000 / SIDE)
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100 / MPP * 0.55)
    meta = adata.uns["he2st"]
    assert meta["target_transform"] == "log1p_cp10k" and meta["encoder"] == "test_vit" and meta["mpp"] == MPP
    assert meta["runtime"] in ("openvino", "onnxruntime")  # the dev extra installs them; auto picks one
    assert isinstance(meta["trained_on"], dict) and isinstance(meta["pitch_um"], float)  # numbers as numbers
    assert not list(reference.parent.glob("*.partial.h5"))
    # rows are the model's predictions for the patches at those spots (chunking keeps the order)
    method = load_method(model_path)
    pick = np.array([0, 33, n - 1])
    with open_slide(slide_path) as slide, torch.inference_mode():
        patches = np.stack([read_patch(slide, tuple(xy[i]), 112 / MPP, 224) for i in pick])
        feats = PatchEmbedder(encoder, EmbedConfig(runtime="torch"), 224)(patches)[0]  # the run used a graph
    spots = SpotSet(np.array(["s"] * 3, dtype=object), np.array(["a", "b", "c"], dtype=object), feats,
                    np.zeros((3, 2)), GENES)
    np.testing.assert_allclose(adata.X[pick], method.predict(spots).expression, rtol=1e-4, atol=1e-5)


def _small_prediction(folder: Path, uncertainty: dict[str, list[float]], mpp: float = 1.0) -> ad.AnnData:
    """What :func:`he2st.predict.store.write_h5ad` makes of a partial file of 4 spots and 2 genes."""
    from he2st.predict.grid import SpotGrid
    from he2st.predict.store import write_h5ad

    partial = folder / "S.partial.h5"
    with h5py.File(partial, "w") as fh:
        fh["expression"] = np.ones((4, 2), np.float32)
        for key, values in uncertainty.items():
            fh[key] = np.asarray(values, np.float32)
            fh[key].attrs["kind"] = "uncertainty"
    grid = SpotGrid(xy=np.array([[10.0, 10], [20, 10], [10, 20], [20, 20]]), names=["s0", "s1", "s2", "s3"],
                    in_tissue=np.ones(4, np.int64), spot_diameter_um=55.0, pitch_um=100.0)
    write_h5ad(partial, folder / "S.h5ad", grid, ["G0", "G1"], np.zeros((4, 4, 3), np.uint8), 0.1, mpp, "S",
               {"slide": "slide.tif"})
    return ad.read_h5ad(folder / "S.h5ad")


def test_in_distribution_is_a_boolean_column_that_selects_its_spots(tmp_path):
    """scverse selects spots by a flag column, ``adata[adata.obs["in_distribution"]]``; a float 0/1 column
    (as the partial file holds it) indexes rows by position there: copies of the first two spots."""
    adata = _small_prediction(tmp_path, {"ood_score": [0.5, 2.0, 0.8, 3.0], "in_distribution": [1, 0, 1, 0]})
    assert adata.obs["in_distribution"].dtype == bool and adata.obs["ood_score"].dtype == np.float32
    assert list(adata[adata.obs["in_distribution"]].obs_names) == ["s0", "s2"]


def test_scale_factors_of_a_prediction_give_its_pixel_size(tmp_path):
    """``spot_diameter_fullres`` is the spot's true diameter (55 µm on the grid); readers of scale factors take
    µm/px from ``microns_per_pixel``, else from a theoretical 65 µm spot (0.59 µm/px for this 0.5)."""
    from he2st.data.readers.visium import full_resolution_pixel_um

    factors = _small_prediction(tmp_path, {}, mpp=MPP).uns["spatial"]["S"]["scalefactors"]
    assert factors["spot_diameter_fullres"] == pytest.approx(55.0 / MPP)
    assert full_resolution_pixel_um(factors, tmp_path / "S.h5ad") == pytest.approx(MPP)


def test_interrupted_prediction_resumes_and_finished_run_is_reused(reference, model_path, slide_path, encoder,
                                                                   tmp_path):
    class Stop(Exception):
        pass

    def die(info):
        raise Stop

    with pytest.raises(Stop):
        predict_slide(model_path, slide_path, tmp_path, chunk=32, encoder=encoder, on_chunk=die)
    partial = tmp_path / "slide.partial.h5"
    assert partial.exists() and not (tmp_path / "slide.h5ad").exists()
    with h5py.File(partial, "r") as fh:
        assert fh.attrs["embedded_chunks"] == 1 and fh.attrs["predicted_chunks"] == 1
    seen = []
    out = predict_slide(model_path, slide_path, tmp_path, chunk=32, encoder=encoder,
                        on_chunk=lambda i: seen.append(i.index))
    assert seen and seen[0] == 1 and not partial.exists()
    np.testing.assert_allclose(ad.read_h5ad(out).X, ad.read_h5ad(reference).X, rtol=1e-5, atol=1e-6)
    mtime, seen = out.stat().st_mtime_ns, []
    predict_slide(model_path, slide_path, tmp_path, chunk=32, encoder=encoder,
                  on_chunk=lambda i: seen.append(i.index))
    assert not seen and out.stat().st_mtime_ns == mtime
    # another arithmetic (bf16 features) is another output: not reused, nor resumed from fp32 chunks
    predict_slide(model_path, slide_path, tmp_path, chunk=32, encoder=encoder, precision="bf16",
                  on_chunk=lambda i: seen.append(i.index))
    assert seen[0] == 0 and ad.read_h5ad(out).uns["he2st"]["fingerprint"] != ad.read_h5ad(reference).uns["he2st"][
        "fingerprint"]


@pytest.mark.parametrize(("context_neighbours", "smooth_neighbours"), [(0, 0), (6, 0), (0, 6)])
def test_neighbourhood_methods_see_whole_neighbourhoods_across_chunks(model_path, slide_path, encoder, tmp_path,
                                                                      context_neighbours, smooth_neighbours):
    """A method that reads each spot's 6 nearest neighbours (as NH2ST does) predicts the same in
    small chunks as in one: chunks are extended by a halo of neighbours -- two hops deep when its
    features also carry the mean of each spot's own neighbours (``context_neighbours``) or its predictions
    are averaged over each spot's neighbours (``smooth_neighbours``)."""
    from he2st.methods import Method, Prediction
    from he2st.methods.layers.neighbourhood import spatial_neighbours

    class Smooth(Method):
        name = "smooth_test"
        context_k = 6

        def _fit(self, train, val, unlabelled):
            raise NotImplementedError

        def _predict(self, spots):
            index, valid = spatial_neighbours(spots.coords_um, spots.sample_ids, self.context_k)
            d = spots.features.shape[1] // self.context_width
            last = (self.context_width - 1) * d  # the neighbour-mean block when there is one
            f = spots.features[:, last : last + len(GENES)]
            total = f + (f[index] * valid[..., None]).sum(axis=1)
            return Prediction((total / (1 + valid.sum(axis=1, keepdims=True))).astype(np.float32), GENES)

        def state(self):
            return {}

        def load_state(self, state, layout):
            pass

    method = Smooth(context_neighbours=context_neighbours, smooth_neighbours=smooth_neighbours)
    two_hops = bool(context_neighbours or smooth_neighbours)
    assert method.halo_hops == ((6, 6) if two_hops else (6,))
    method.card = load_method(model_path).card
    whole = ad.read_h5ad(predict_slide(method, slide_path, tmp_path / "a", chunk=10_000, encoder=encoder)).X
    seen = []
    chunked = predict_slide(method, slide_path, tmp_path / "b", chunk=16, encoder=encoder,
                            on_chunk=lambda info: seen.append(info.index))
    assert len(seen) > 5
    result = ad.read_h5ad(chunked)
    # on a hexagonal lattice an edge spot's 6th neighbour can tie with a 7th; either is a correct choice
    from scipy.spatial import cKDTree

    dist = cKDTree(result.obsm["spatial"]).query(result.obsm["spatial"], k=8)[0]
    clear = dist[:, 7] - dist[:, 6] > 1e-6
    assert clear.mean() > 0.6
    if two_hops:  # a spot is clear when its neighbours are clear too
        index, _ = spatial_neighbours(result.obsm["spatial"], np.zeros(len(clear)), 6)
        clear &= clear[index].all(axis=1)
        assert clear.mean() > 0.3
    np.testing.assert_allclose(result.X[clear], whole[clear], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("whole_samples", [False, True])
def test_methods_trained_end_to_end_get_the_patches_of_every_spot_they_read(model_path, slide_path, encoder, tmp_path,
                                                                            whole_samples):
    """A method that reads raw patches (an encoder trained end to end, or an ensemble with such a member) gets
    them for the halo of neighbours it reads and, when it predicts whole samples, for every spot of the slide:
    small chunks predict as one."""
    from he2st.methods import Method, Prediction
    from he2st.methods.layers.neighbourhood import spatial_neighbours

    class PatchMean(Method):
        name = "patch_mean_test"
        context_k = 6

        @property
        def uses_patches(self) -> bool:
            return True

        @property
        def predicts_whole_samples(self) -> bool:
            return whole_samples

        def _fit(self, train, val, unlabelled):
            raise NotImplementedError

        def _predict(self, spots):
            assert spots.patches is not None and len(spots.patches) == len(spots)
            red = np.asarray(spots.patches, np.float64)[..., 0].mean(axis=(1, 2))
            index, valid = spatial_neighbours(spots.coords_um, spots.sample_ids, self.context_k)
            value = (red + (red[index] * valid).sum(axis=1)) / (1 + valid.sum(axis=1))
            return Prediction(np.repeat(value[:, None], len(GENES), axis=1).astype(np.float32), GENES)

        def state(self):
            return {}

        def load_state(self, state, layout):
            pass

    method = PatchMean()
    method.card = load_method(model_path).card
    whole = ad.read_h5ad(predict_slide(method, slide_path, tmp_path / "a", chunk=10_000, encoder=encoder))
    chunked = ad.read_h5ad(predict_slide(method, slide_path, tmp_path / "b", chunk=16, encoder=encoder))
    # a spot's 6th neighbour can tie with a 7th on the hexagonal lattice; either is a correct choice
    from scipy.spatial import cKDTree

    dist = cKDTree(whole.obsm["spatial"]).query(whole.obsm["spatial"], k=8)[0]
    clear = dist[:, 7] - dist[:, 6] > 1e-6
    assert clear.mean() > 0.6 and np.ptp(whole.X[:, 0]) > 0
    np.testing.assert_allclose(chunked.X[clear], whole.X[clear], rtol=1e-5, atol=1e-5)


def test_methods_reading_the_context_field_get_it_cut_and_embedded_around_each_spot(model_path, slide_path, encoder,
                                                                                 tmp_path):
    """A model with ``context_field`` is given, beside each spot's features, those of the field 3x its
    side around it -- cut from the slide and embedded as in training -- in every chunk."""
    from he2st.methods import Method, Prediction

    seen = {}

    class FieldReader(Method):
        name = "field_test"

        def _fit(self, train, val, unlabelled):
            raise NotImplementedError

        def _predict(self, spots):
            d = spots.features.shape[1] // 2
            seen["spot"], seen["field"] = spots.features[:, :d], spots.features[:, d:]
            return Prediction(spots.features[:, d : d + len(GENES)].astype(np.float32), GENES)

        def state(self):
            return {}

        def load_state(self, state, layout):
            pass

    method = FieldReader(context_field=True)
    assert method.reads_views == ["field"] and method.context_width == 2
    method.card = load_method(model_path).card
    whole = ad.read_h5ad(predict_slide(method, slide_path, tmp_path / "a", chunk=10_000, encoder=encoder))
    assert seen["field"].shape == seen["spot"].shape and not np.allclose(seen["field"], seen["spot"])
    chunked = ad.read_h5ad(predict_slide(method, slide_path, tmp_path / "b", chunk=16, encoder=encoder))
    np.testing.assert_allclose(chunked.X, whole.X, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_methods_reading_tiles_and_another_encoder_get_them_made_as_embed_makes_them(model_path, slide_path, encoder,
                                                                                   tmp_path):
    """A model with ``views`` is given each view beside the spot's features, embedded as ``he2st embed``
    embeds it: the spot patch's 2 x 2 tiles with the model's encoder, the spot patch with Lite0."""
    from he2st.methods import Method, Prediction

    seen = {}

    class ViewReader(Method):
        name = "view_test"

        def _fit(self, train, val, unlabelled):
            raise NotImplementedError

        def _predict(self, spots):
            d = (spots.features.shape[1] - 1280) // 2
            seen["spot"], seen["tiles"], seen["lite0"] = np.split(spots.features, [d, 2 * d], axis=1)
            return Prediction(seen["tiles"][:, : len(GENES)].astype(np.float32), GENES)

        def state(self):
            return {}

        def load_state(self, state, layout):
            pass

    method = ViewReader(views=["tiles", "efficientnet_lite0"])
    method.card = load_method(model_path).card
    whole = ad.read_h5ad(predict_slide(method, slide_path, tmp_path / "a", chunk=10_000, encoder=encoder))
    assert seen["lite0"].shape[1] == 1280 and seen["tiles"].shape == seen["spot"].shape
    with open_slide(slide_path) as slide:
        xy = whole.obsm["spatial"][:4]
        patches = read_patches(slide, xy, PatchSpec().field_um / MPP, PatchSpec().size_px)
    config = EmbedConfig(encoder=encoder.spec.name, device="cpu")
    expected, _ = PatchEmbedder(encoder, config, PatchSpec().size_px, tiles=2)(patches)
    np.testing.assert_allclose(seen["tiles"][:4], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(seen["tiles"], seen["spot"], atol=1e-3)
    chunked = ad.read_h5ad(predict_slide(method, slide_path, tmp_path / "b", chunk=16, encoder=encoder))
    np.testing.assert_allclose(chunked.X, whole.X, rtol=1e-5, atol=1e-6)


def test_retrieval_methods_with_query_context_get_a_halo():
    """Query-time neighbour context (CarHE's and BLEEP's; off in BLEEP as published) reads the nearest
    spots, so chunked prediction must extend chunks by them, as it does for NH2ST."""
    assert create_method("carhe").context_k == 6
    assert create_method("carhe", query_neighbours=0).context_k == 0
    assert create_method("bleep").context_k == 6
    assert create_method("bleep_faithful").context_k == 0
    assert create_method("bleep", query_neighbours=3).context_k == 3
    assert create_method("nh2st").context_k == 8
    assert create_method("nh2st", neighbours=False).context_k == 8  # the head still reads the neighbours
    assert create_method("nh2st", head_neighbour_context=False).context_k == 0  # the branch is training-only
    assert create_method("nh2st_faithful").context_k == 0


def test_slide_is_encoded_with_the_stain_and_tta_of_the_models_training(model_path, slide_path, encoder, tmp_path):
    """Features at prediction are made as in training (recorded embedding config), unless overridden."""
    method = load_method(model_path)
    method.card = method.card.model_copy(update={
        "embedding": EmbedConfig(encoder=encoder.spec.name, stain="macenko", tta="flips")})
    stained = method.save(tmp_path / "stained.pt")
    as_trained = ad.read_h5ad(predict_slide(stained, slide_path, tmp_path / "a", encoder=encoder))
    assert (as_trained.uns["he2st"]["stain"], as_trained.uns["he2st"]["tta"]) == ("macenko", "flips")
    plain = ad.read_h5ad(predict_slide(stained, slide_path, tmp_path / "b", encoder=encoder, stain="none", tta="none"))
    assert (plain.uns["he2st"]["stain"], plain.uns["he2st"]["tta"]) == ("none", "none")
    assert not np.allclose(as_trained.X, plain.X)


def test_gene_subset_and_user_mask(model_path, slide_path, encoder, tmp_path):
    with open_slide(slide_path) as slide:
        thumb, _ = slide.thumbnail(500)
    mask = np.zeros(thumb.shape[:2], dtype=np.uint8)
    mask[:, : thumb.shape[1] // 2] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    out = predict_slide(model_path, slide_path, tmp_path / "o", genes="G3,G1", mask=tmp_path / "left.png",
                        encoder=encoder)
    adata = ad.read_h5ad(out)
    assert list(adata.var_names) == ["G3", "G1"] and (adata.obsm["spatial"][:, 0] < SIDE / 2).all()
    assert adata.uns["he2st"]["tissue"].startswith("mask:")
    Image.fromarray(mask[:, :100]).save(tmp_path / "narrow.png")
    with pytest.raises(He2stError, match="aspect"):
        load_mask(tmp_path / "narrow.png", slide_size=(SIDE, SIDE))
    with pytest.raises(He2stError, match="not in the model's panel"):
        predict_slide(model_path, slide_path, tmp_path / "x", genes="NOPE", encoder=encoder)


@pytest.mark.parametrize(("kind", "message"), [
    ("empty", "no tissue found"), ("grayscale", "not H&E-like"),
    ("speck", r"tissue found is too small: its largest piece covers 0\.00\d+ mm², below the 0\.02 mm²"),
])
def test_empty_and_grayscale_slides_are_refused(kind, message, model_path, encoder, tmp_path):
    """An empty slide, a grayscale one and one whose only H&E is a fragment below the speck limit are each
    refused with their own reason (the fragment is H&E, not "grayscale or fluorescence")."""
    img = tissue_image(1200, 1200, seed=5)
    if kind == "empty":
        img = np.full_like(img, 242)
    elif kind == "speck":  # a 100 x 100 µm H&E fragment: about 0.005 mm² of tissue
        img = np.full_like(img, 242)
        img[500:700, 500:700] = tissue_image(200, 200, seed=5)
    else:
        img = np.repeat(img.mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    path = write_pyramid(tmp_path / f"{kind}.tif", img, MPP)
    with pytest.raises(He2stError, match=message) as err:
        predict_slide(model_path, path, tmp_path / "out", encoder=encoder)
    assert str(path) in str(err.value)
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_too_coarse_or_unknown_pixel_size_is_refused(model_path, slide_path, encoder, tmp_path):
    with pytest.raises(He2stError, match=r"2 µm/px is too coarse.*0\.5 µm/px.*1 µm/px or finer"):
        predict_slide(model_path, slide_path, tmp_path, mpp=2.0, encoder=encoder)
    # 2x upsampling is allowed (a coarse grid keeps this quick)
    predict_slide(model_path, slide_path, tmp_path, mpp=1.0, pitch_um=500, encoder=encoder, genes="G0")
    png = tmp_path / "plain.png"
    Image.fromarray(tissue_image(600, 600)).save(png)
    with pytest.raises(He2stError, match="--mpp"):
        predict_slide(model_path, png, tmp_path, encoder=encoder)


@pytest.fixture(scope="module")
def hires_model_path(model_path, tmp_path_factory) -> Path:
    """The kNN model of ``model_path`` with a card saying it trained on 3.5 µm/px slides (hires-only Visium)."""
    method = load_method(model_path)
    method.card = method.card.model_copy(update={"training_pixel_size_um": {"T1": 3.5, "T2": 3.2}})
    return method.save(tmp_path_factory.mktemp("hires") / "knn.pt")


@pytest.mark.slow
def test_resolution_limit_follows_the_training_slides(model_path, hires_model_path, slide_path, encoder, tmp_path):
    """A model trained at 3.5 µm/px predicts a 3.5 µm/px slide (7x upsampling) and refuses a 30 µm/px one;
    ``max_upsample`` sets the limit for either model; a card without training µm/px keeps the 2x rule."""
    assert load_method(model_path).card.training_pixel_size_um == {}  # a card written without the field
    quick = {"pitch_um": 500, "genes": "G0", "encoder": encoder}  # a coarse grid keeps this quick
    path = predict_slide(hires_model_path, slide_path, tmp_path / "hires", mpp=3.5, **quick)
    assert ad.read_h5ad(path).n_obs > 0
    with pytest.raises(He2stError, match=r"30 µm/px is too coarse.*60\.0x, more than 14x.*training slides "
                                         r"\(3\.2-3\.5 µm/px\).*--max-upsample") as err:
        predict_slide(hires_model_path, slide_path, tmp_path / "x", mpp=30.0, **quick)
    assert str(slide_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(He2stError, match=r"records no training µm/px.*--max-upsample to at least 7"):
        predict_slide(model_path, slide_path, tmp_path / "x", mpp=3.5, **quick)
    predict_slide(model_path, slide_path, tmp_path / "explicit", mpp=3.5, max_upsample=8, **quick)
    with pytest.raises(He2stError, match=r"more than 2x.*training slides"):
        predict_slide(hires_model_path, slide_path, tmp_path / "x", mpp=3.5, max_upsample=2, **quick)
    with pytest.raises(He2stError, match="max_upsample"):
        predict_slide(model_path, slide_path, tmp_path / "x", mpp=3.5, max_upsample=0, **quick)
    card = dict(load_method(hires_model_path).card.describe())
    assert card["training µm/px"] == "3.2-3.5 (median 3.35): predict allows 14x upsampling"


def test_cli_predict_plot_report(model_path, slide_path, encoder, tmp_path):
    import typer
    from typer.testing import CliRunner

    from he2st.cli_predict import register

    app = typer.Typer()
    register(app)
    weights = tmp_path / "test_vit.pth"
    torch.save(encoder.backbone.state_dict(), weights)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--model", str(model_path), "--slide", str(slide_path), "--out",
                              str(tmp_path / "pred"), "--weights", str(weights), "--pitch-um", "200"])
    assert res.exit_code == 0, res.output
    h5ad = tmp_path / "pred" / "slide.h5ad"
    assert h5ad.exists() and (tmp_path / "pred" / "slide" / "maps.png").exists()
    res = runner.invoke(app, ["plot", str(h5ad), "--genes", "G0,G2", "--out", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "figs" / "maps.png").size[0] > 300
    assert (tmp_path / "figs" / "uncertainty.png").exists()
    results = {"provenance": {"command": "he2st benchmark <x>"}, "summary": [
        {"method": "knn", "gene_set": "heg50", "metric": "pearson_mean", "mean": 0.21, "sd": 0.05, "n_folds": 4}],
        "folds": [{"method": "mlp", "fold": "patient_A",  # as `he2st benchmark` writes them
                   "curves": {"seed0": {"train_loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.9, 0.8]}}}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    res = runner.invoke(app, ["report", str(h5ad), "--results", str(tmp_path / "results.json"),
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / "slide.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "&lt;x&gt;" in page and "0.210 ± 0.050" in page
    assert "Training curves" in page and "Uncertainty" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    res = runner.invoke(app, ["predict", "--model", str(model_path), "--slide", str(slide_path), "--mpp", "4",
                              "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, He2stError) and "too coarse" in str(res.exception)


# ---------------------------------------------------------------------------- real her2st data
@pytest.mark.slow  # reads every real her2st image
def test_tissue_detection_on_her2st_covers_annotated_spots(her2st):
    from scipy import ndimage as ndi

    from he2st.data.her2st import IMAGED_SECTIONS, load_section

    for section in IMAGED_SECTIONS:
        sample = load_section(section)
        thumb, scale = sample.slide.thumbnail(1000)
        mask = detect_tissue(thumb, sample.pixel_size_um / scale, where=section)
        xy = np.floor(sample.spatial * scale).astype(int)
        assert mask[xy[:, 1], xy[:, 0]].mean() >= 0.95, section
        spots = np.zeros(mask.shape, dtype=bool)
        spots[xy[:, 1], xy[:, 0]] = True
        far = ndi.distance_transform_edt(~spots) * sample.pixel_size_um / scale > 400  # > 2 spot pitches away
        assert mask[far].mean() < 0.05, section  # background (glass, haze, black frame) is left out
        sample.close()


@pytest.mark.slow  # trains on real sections and embeds them
def test_her2st_b4_predicted_at_its_own_spots(prepared, encoder, tmp_path):
    """kNN trained on patient C, predicted at B4's spots (the tiny ViT keeps it fast on CPU; the
    real-encoder path is the same code with another name)."""
    from he2st.data.patches import PatchCache
    from he2st.data.sample import Sample
    from he2st.workflows.train import train_model
    from he2st.report.html import build_report
    from he2st.report.plots import plot_prediction
    from he2st.data.workspace import Workspace
    from he2st.workflows.config import TrainRunConfig

    ws = Workspace(prepared)
    model = tmp_path / "knn.pt"
    weights = tmp_path / "test_vit.pth"
    torch.save(encoder.backbone.state_dict(), weights)
    train_model(TrainRunConfig(work_dir=prepared, method="knn", train_samples=["C2", "C3"], out=model,
                               embed=EmbedConfig(encoder="test_vit", weights=weights)))
    out = predict_slide(model, None, tmp_path / "pred", spots_from=ws.sample_path("B4"), chunk=128, weights=weights)
    adata = ad.read_h5ad(out)
    b4 = Sample.load(ws.sample_path("B4"))
    assert adata.n_obs == 283 == b4.n_spots and list(adata.obs_names) == list(b4.adata.obs_names)
    assert adata.n_vars == 250 and np.isfinite(adata.X).all()
    np.testing.assert_array_equal(adata.obsm["spatial"], b4.spatial)
    assert "B4" in adata.uns["spatial"] and adata.uns["he2st"]["spots"] == "sample:B4"
    with open_slide(b4.image_path) as slide:  # the same pixels `he2st prepare` cut for training
        patches = read_patches(slide, b4.spatial[:8], 112 / b4.pixel_size_um, 224)
    np.testing.assert_array_equal(patches, PatchCache(ws.patch_path("B4", PatchSpec())).read(0, 8))
    paths = plot_prediction(out, tmp_path / "figs", sample=b4)
    assert {"maps", "compare", "scatter", "uncertainty"} <= set(paths) and all(p.exists() for p in paths.values())
    page = build_report(out, tmp_path / "report.html", sample=b4).read_text()
    assert "Predicted vs measured (B4)" in page and "283 spots matched by barcode" in page


def test_predict_format_zarr_writes_a_spatialdata_store(model_path, slide_path, encoder, tmp_path):
    """`he2st predict --format zarr`: a SpatialData store beside the .h5ad, read back with spatialdata: the
    predictions as its table, the spots as circles and the H&E as a pyramid, all in µm."""
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.transformations import get_transformation

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = predict_slide(model_path, slide_path, tmp_path / "pred", pitch_um=200, encoder=encoder, format="zarr")
    assert not [w for w in caught if "autosharding" in str(w.message)]  # a library notice that says nothing to users
    sdata = spatialdata.read_zarr(out.with_suffix(".zarr"))
    adata = ad.read_h5ad(out)
    table = sdata.tables["table"]
    np.testing.assert_allclose(np.asarray(table.X), np.asarray(adata.X))
    assert list(table.var_names) == list(adata.var_names) and "best_similarity" in table.obs
    spots = sdata.shapes["spots"]
    assert len(spots) == adata.n_obs
    centres = np.column_stack([spots.geometry.x, spots.geometry.y])
    np.testing.assert_allclose(centres, adata.obsm["spatial"] * MPP, rtol=1e-6)  # level-0 px -> µm
    assert spots["radius"].iloc[0] == pytest.approx(200 * 0.55 / 2)  # spots 0.55 x the pitch across, as Visium
    image = sdata.images["he"]
    assert "um" in get_transformation(image, get_all=True) and "um" in sdata.coordinate_systems
    assert table.uns["spatialdata_attrs"]["region"] == "spots"


def _three_slides(slide_path: Path, folder: Path) -> list[Path]:
    folder.mkdir()
    slides = [folder / f"slide{i}.tif" for i in range(3)]
    for i, path in enumerate(slides):
        write_pyramid(path, tissue_image(SIDE, SIDE, seed=10 + i), MPP)
    return slides


@pytest.mark.slow  # two slides through a process pool and Ray
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_many_slides_one_command_equal_one_by_one(model_path, slide_path, encoder, tmp_path, engine):
    """`he2st predict --manifest` on an engine with two workers: every slide's output equals predicting it
    alone, a broken slide is recorded with its error while the others finish, and index.csv lists all."""
    if engine == "ray":
        pytest.importorskip("ray")
    from in_process import run_cli

    weights = tmp_path / "test_vit.pth"
    torch.save(encoder.backbone.state_dict(), weights)
    slides = _three_slides(slide_path, tmp_path / "slides")
    (tmp_path / "slides" / "broken.tif").write_text("not an image")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide,mpp\n" + "".join(f"slides/{p.name},{MPP}\n" for p in slides) + "slides/broken.tif,\n")
    out = tmp_path / "batch"
    result = run_cli("predict", "--model", model_path, "--manifest", manifest, "--out", out, "--engine", engine,
                     "--workers", "2", "--weights", weights, "--pitch-um", "200", "--set", "chunk=64")
    assert result.returncode == 1, result.stderr  # one slide failed: a non-zero exit, the others written
    assert "3 of 4 slides predicted" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # the failure summary
    assert len(errors) == 1 and "broken.tif" in errors[0] and "Traceback" not in result.stderr, result.stderr
    index = pd.read_csv(out / "index.csv")
    assert list(index["status"]) == ["done", "done", "done", "failed"]
    assert index["slide"].iloc[3].endswith("broken.tif") and len(index["error"].iloc[3]) > 0
    for path in slides:
        alone = predict_slide(model_path, path, tmp_path / "alone", pitch_um=200, chunk=64, weights=weights)
        batch = ad.read_h5ad(out / f"{path.stem}.h5ad")
        np.testing.assert_array_equal(batch.X, ad.read_h5ad(alone).X)
        np.testing.assert_array_equal(batch.obsm["spatial"], ad.read_h5ad(alone).obsm["spatial"])
        assert (out / path.stem / "maps.png").is_file()  # each slide's maps beside it, as for one slide
    assert not (out / "broken").exists()


@pytest.mark.parametrize(("flag", "message"), [
    ("--library-id", "library_id names the output of one slide"), ("--mask", "--mask belongs to one slide"),
    ("--spots-from", "--spots-from belongs to one slide")])
def test_one_slides_settings_for_several_slides_are_refused_before_any_work(model_path, slide_path, tmp_path, flag,
                                                                             message):
    """--library-id names one output, --mask one slide's tissue, --spots-from one slide's spots: with several
    slides they would be every slide's (spots on another slide's background), so each is refused in one line
    with exit 2 and nothing written."""
    from in_process import run_cli

    out = tmp_path / "batch"
    value = "mine" if flag == "--library-id" else str(tmp_path / "any.png")
    result = run_cli("predict", "--model", model_path, "--slide", slide_path, "--slide", slide_path,
                     flag, value, "--out", out)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_manifest_row_may_name_only_its_sample(tmp_path):
    """A manifest row with ``spots_from`` and no ``slide`` predicts on the sample's own image (as
    ``--spots-from`` alone does); a row with neither is refused in one line naming its row."""
    from he2st.predict.config import PredictConfig
    from he2st.workflows.batch_predict import read_manifest, slide_configs

    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,spots_from\n,samples/B4.h5ad\nslides/x.tif,\n")
    configs = slide_configs(PredictConfig(out=tmp_path / "o"), read_manifest(manifest), manifest)
    assert configs[0].slide is None and configs[0].spots_from == tmp_path / "samples" / "B4.h5ad"
    assert configs[1].slide == tmp_path / "slides" / "x.tif"
    manifest.write_text("slide,spots_from,mpp\n,,0.5\n")
    with pytest.raises(He2stError, match="row 2: neither a slide nor spots_from"):
        slide_configs(PredictConfig(out=tmp_path / "o"), read_manifest(manifest), manifest)
    manifest.write_text("slide,mpp\nslides/x.tif,nan\n")
    with pytest.raises(He2stError, match="row 2: mpp 'nan' is not a positive pixel size"):
        slide_configs(PredictConfig(out=tmp_path / "o"), read_manifest(manifest), manifest)


@pytest.mark.parametrize(("resolution", "unit", "recorded"), [(72, "INCH", 352.778), (10, "CENTIMETER", 1000.0)])
def test_screen_default_resolution_is_an_unknown_pixel_size(tmp_path, resolution, unit, recorded):
    """An editor's 72 dpi or libvips' 10 px/cm is not a scan's pixel size: predict asks for --mpp, saying what
    the file records, instead of refusing the slide as too coarse with advice to upsample 700x."""
    import tifffile

    from he2st.data.patches import check_resolution
    from he2st.predict.slide import resolve_mpp

    path = tmp_path / "edited.tif"
    tifffile.imwrite(path, tissue_image(64, 64), photometric="rgb", tile=(32, 32), resolution=(resolution, resolution),
                     resolutionunit=unit)
    with open_slide(path) as slide:
        assert slide.recorded_mpp == pytest.approx(recorded, rel=1e-4) and slide.embedded_mpp is None
        with pytest.raises(He2stError, match=rf"records {recorded:g} µm/px, a screen or editor default.*pass --mpp"):
            resolve_mpp(None, slide)
        assert resolve_mpp(0.5, slide) == 0.5
    with pytest.raises(He2stError, match=r"check the pixel size \(set it with --mpp\).*--max-upsample to at least"):
        check_resolution(30.0, PatchSpec(), path, training_mpp=[0.5], option="--max-upsample", mpp_option="--mpp")


def test_a_pitch_under_a_pixel_or_a_huge_grid_is_refused_in_one_line(model_path, slide_path, encoder, tmp_path):
    """A mistyped --pitch-um is refused naming its value, not found out as an allocation failure."""
    from he2st.predict.grid import MAX_GRID_POINTS

    with pytest.raises(He2stError, match=r"a 0\.001 µm spot pitch \(--pitch-um\) is under one pixel.*0\.5 µm/px"):
        predict_slide(model_path, slide_path, tmp_path / "x", pitch_um=0.001, encoder=encoder)
    assert not (tmp_path / "x").exists()
    mask = np.ones((100, 100), bool)  # a 10 cm square of tissue at 1 µm/px: 1.15e10 points at a 1 µm pitch
    with pytest.raises(He2stError, match=rf"1 µm spot pitch.*more than {MAX_GRID_POINTS:,}; choose a coarser"):
        hex_grid(mask, 0.001, pitch_um=1.0, mpp=1.0, where="slide.tif")


def test_spots_of_a_sample_are_not_placed_on_another_sized_slide(slide_path, tmp_path):
    """With --spots-from, a --slide other than the sample's image must be one of its size: the spots' pixel
    positions and µm/px are that image's, and on another scan they would cut patches elsewhere."""
    from types import SimpleNamespace

    from he2st.predict.slide import _check_same_image

    small = tmp_path / "export.png"
    Image.fromarray(tissue_image(300, 200)).save(small)
    same_size = tmp_path / "copy.png"
    with open_slide(slide_path) as slide:
        Image.fromarray(tissue_image(*slide.dimensions)).save(same_size)
        sample = SimpleNamespace(sample_id="S1", image_path=small)
        with pytest.raises(He2stError, match=r"spots of sample S1 are placed on its image .*export.png \(200x300 px\)"):
            _check_same_image(slide, sample)
        _check_same_image(slide, SimpleNamespace(sample_id="S1", image_path=same_size))  # another file, same size
        _check_same_image(slide, SimpleNamespace(sample_id="S1", image_path=tmp_path / "moved.tif"))  # gone: no check
