"""Views of a spot beyond its own patch: sub-spot tiles, another encoder's embedding, the context field.

``he2st embed`` makes the views ``embed.views`` lists beside the spot embeddings, spot sets carry the
views a method reads, and a method's ``views`` option appends them to its features (tiny synthetic
sections, a seeded tiny ViT and the offline Lite0 as the second encoder).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from synthetic import embedded_sections

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.genes import GeneConfig, GenePanel
from he2st.data.patches import PatchSpec
from he2st.data.spots import load_spots
from he2st.data.views import tile_patches
from he2st.data.workspace import Workspace
from he2st.encoders import create
from he2st.encoders.inference import PatchEmbedder
from he2st.encoders.weights import weights_sha256
from he2st.errors import He2stError
from he2st.methods import create_method, load_method
from he2st.workflows.cards import model_card, view_files
from he2st.workflows.config import BenchmarkConfig, TrainRunConfig
from he2st.workflows.embed import embed_workspace, patches_to_embed
from he2st.workflows.predict_slide import predict_slide
from he2st.workflows.train import train_model

PATIENTS = {"S1": "P1", "S2": "P2", "S3": "P3"}
GENE_NAMES = [f"G{i}" for i in range(30)]
VIEWS = ["tiles", "efficientnet_lite0"]


def test_tiles_are_cut_patch_by_patch_in_row_major_order():
    patches = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    tiles = tile_patches(patches, 2)
    assert tiles.shape == (8, 2, 2, 3)
    np.testing.assert_array_equal(tiles[0], patches[0, :2, :2])
    np.testing.assert_array_equal(tiles[1], patches[0, :2, 2:])
    np.testing.assert_array_equal(tiles[2], patches[0, 2:, :2])
    np.testing.assert_array_equal(tiles[7], patches[1, 2:, 2:])


def test_tiles_view_is_the_mean_embedding_of_the_enlarged_tiles():
    """Each tile is enlarged to the encoder's input like any patch, so the view sees cells at twice the scale."""
    torch.manual_seed(0)
    encoder = create("test_vit", pretrained=False)
    config = EmbedConfig(encoder="test_vit", runtime="torch", device="cpu")
    patches = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    tiled, tokens = PatchEmbedder(encoder, config, 64, tiles=2)(patches)
    one_by_one, _ = PatchEmbedder(encoder, config, 32)(tile_patches(patches, 2))
    assert tokens is None and tiled.shape == (3, encoder.embed_dim)
    np.testing.assert_allclose(tiled, one_by_one.reshape(3, 4, -1).mean(1), rtol=1e-5, atol=1e-6)
    whole, _ = PatchEmbedder(encoder, config, 64)(patches)
    assert not np.allclose(tiled, whole, atol=1e-3)


def test_view_names_are_checked_where_they_are_set():
    assert EmbedConfig(views="tiles, efficientnet_lite1").views == ["tiles", "efficientnet_lite1"]
    with pytest.raises(ValueError, match="embedded whenever `he2st prepare` cut it"):
        EmbedConfig(views=["field"])


@pytest.fixture(scope="module")
def viewed(tmp_path_factory):
    """Three synthetic sections embedded with their sub-spot tiles and Lite0 as a second encoder."""
    work, embed = embedded_sections(tmp_path_factory.mktemp("views"), PATIENTS, GENE_NAMES)
    embed = embed.model_copy(update={"views": VIEWS, "runtime": "torch"})
    ws = Workspace(work)
    assert patches_to_embed(ws, sorted(PATIENTS), PatchSpec(), embed) == 75 * 4  # spot, field, tiles, Lite0
    summary = embed_workspace(ws, sorted(PATIENTS), PatchSpec(), embed)
    assert summary.n_embedded == 75 * 2  # the spot and field embeddings were there: the two views are made
    return work, embed


@pytest.mark.slow
def test_embed_makes_each_listed_view_once_and_spot_sets_carry_them(viewed):
    work, embed = viewed
    ws = Workspace(work)
    assert embed_workspace(ws, sorted(PATIENTS), PatchSpec(), embed).n_embedded == 0  # reused
    tiles = EmbeddingFile(ws.view_path(embed, "S1", PatchSpec(), "tiles"))
    lite0 = EmbeddingFile(ws.view_path(embed, "S1", PatchSpec(), "efficientnet_lite0"))
    assert tiles.attrs["tiles"] == "2" and tiles.path.name.startswith("S1__112um_224px__tiles-2")
    assert lite0.encoder_spec["name"] == "efficientnet_lite0" and lite0.path.parent.name == "efficientnet_lite0"
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=20, min_spot_fraction=0.0))
    spots = load_spots(ws, ["S1", "S2"], PatchSpec(), embed, panel, with_targets=True,
                       views=["field", *VIEWS, "uni"])  # no uni embeddings: left out
    assert sorted(spots.views) == ["efficientnet_lite0", "field", "tiles"]
    d = spots.features.shape[1]
    assert spots.views["tiles"].shape == (50, d) and spots.views["efficientnet_lite0"].shape == (50, 1280)
    assert not np.allclose(spots.views["tiles"], spots.features)
    plain = load_spots(ws, ["S1"], PatchSpec(), embed, panel, with_targets=False)
    assert sorted(plain.views) == ["field"]  # by default the field only


@pytest.mark.slow
def test_methods_append_the_views_they_name_and_refuse_missing_ones(viewed, tmp_path):
    work, embed = viewed
    ws = Workspace(work)
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=20, min_spot_fraction=0.0))
    method = create_method("ridge_cv", pca_components=8, context_field=True, views=["tiles", "efficientnet_lite0"])
    assert method.views == ["field", *VIEWS] and method.context_width == 4
    method.panel = panel
    train = load_spots(ws, ["S1", "S2"], PatchSpec(), embed, panel, with_targets=True, views=method.reads_views)
    test = load_spots(ws, ["S3"], PatchSpec(), embed, panel, with_targets=False, views=method.reads_views)
    method.fit(train)
    d = train.features.shape[1]
    assert method.feature_dim == 3 * d + 1280
    pred = method.predict(test).expression
    back = load_method(method.save(tmp_path / "m.pt"))
    np.testing.assert_allclose(back.predict(test).expression, pred, rtol=1e-5, atol=1e-6)
    lacking = load_spots(ws, ["S3"], PatchSpec(), embed, panel, with_targets=False, views=["field", "tiles"])
    with pytest.raises(He2stError, match=r"each spot's efficientnet_lite0 embedding .*he2st embed --set "
                                         r"'embed.views=\[efficientnet_lite0\]'"):
        method.predict(lacking)


@pytest.mark.slow
def test_an_encoder_views_weights_are_recorded_and_checked_when_a_slide_is_predicted(viewed, tmp_path):
    work, embed = viewed
    ws = Workspace(work)
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=20, min_spot_fraction=0.0))
    method = create_method("ridge", pca_components=8, views=["tiles", "efficientnet_lite0"])
    views = view_files(ws, embed, "S1", PatchSpec(), method.reads_views)
    assert list(views) == ["efficientnet_lite0"]  # the tiles are the spot encoder's
    spot_file = EmbeddingFile(ws.embedding_path(embed, "S1", PatchSpec()))
    method.card = model_card("ridge", panel, spot_file, PatchSpec(), embed, {}, {"S1": "P1"}, views=views)
    record = method.card.view_encoders["efficientnet_lite0"]
    assert record["weights_sha256"] == weights_sha256(create("efficientnet_lite0").spec) is not None
    assert "efficientnet_lite0: weights" in dict(method.card.describe())["view encoders"]
    method.panel = panel
    method.fit(load_spots(ws, ["S1", "S2"], PatchSpec(), embed, panel, with_targets=True, views=method.reads_views))
    predict_slide(method, None, tmp_path / "pred", spots_from=ws.sample_path("S3"), runtime="torch")
    method.card.view_encoders["efficientnet_lite0"]["weights_sha256"] = "0" * 64
    with pytest.raises(He2stError, match=r"the efficientnet_lite0 weights here \(sha256 .*\) are not those the ridge "
                                         r"model's 'efficientnet_lite0' view was trained with"):
        predict_slide(method, None, tmp_path / "other", spots_from=ws.sample_path("S3"), runtime="torch")
    assert not list((tmp_path / "other").glob("*.h5*"))  # refused before a prediction was written


@pytest.mark.slow
def test_ensemble_tries_a_view_candidate_and_leaves_out_one_not_embedded(viewed):
    work, embed = viewed
    ws = Workspace(work)
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=20, min_spot_fraction=0.0))
    method = create_method("ensemble", members={"knn": {"method": "knn", "top_k": 5}}, min_selection_folds=2,
                           context=[{}, {"views": ["tiles"]}, {"views": ["uni"]}], smoothing=[])
    assert method.reads_views == ["tiles", "uni"]
    spots = load_spots(ws, sorted(PATIENTS), PatchSpec(), embed, panel, with_targets=True, views=method.reads_views)
    method.panel = panel
    method.card = method.card.model_copy(update={"training_samples": PATIENTS})
    tried = method.fit(spots).selection["context_inner_pearson"]["knn"]
    assert sorted(tried) == ['{"views": ["tiles"]}', "{}"] and all(len(v) == 3 for v in tried.values())


@pytest.mark.slow
def test_ensemble_tries_every_embedded_view_only_where_its_inner_folds_select(viewed):
    work, embed = viewed
    ws = Workspace(work)
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=20, min_spot_fraction=0.0))
    spots = load_spots(ws, sorted(PATIENTS), PatchSpec(), embed, panel, with_targets=True, views=["field", *VIEWS])
    members = {"knn": {"method": "knn", "top_k": 5}, "ridge": {"method": "ridge", "views": []}}
    tried = {}
    for folds in (3, 4):  # three patients, three inner folds: they select when three are needed, not when four are
        method = create_method("ensemble", members=members, min_selection_folds=folds, context=[{}], smoothing=[],
                               query_neighbours=[], candidates=[])
        assert method.chooses_views and method.reads_views == []
        method.panel = panel
        method.card = method.card.model_copy(update={"training_samples": PATIENTS})
        tried[folds] = method.fit(spots).selection["context_inner_pearson"]
    # each embedded view but the field is one more variant of a member whose spec leaves its views open
    assert sorted(tried[3]["knn"]) == ['{"views": ["efficientnet_lite0"]}', '{"views": ["tiles"]}', "{}"]
    assert list(tried[3]["ridge"]) == ["{}"]  # its spec sets views: pinned
    assert list(tried[4]["knn"]) == ["{}"]  # too few inner folds to choose: the member as configured


@pytest.mark.slow
def test_a_trained_ensemble_records_and_predicts_with_the_embedded_view_it_chose(viewed, tmp_path):
    """``he2st train`` loads every embedded view for the ensemble; a member that takes a view is saved with it,
    the card records the view's encoder, and the checkpoint predicts a slide as the fitted model did."""
    work, embed = viewed
    ws = Workspace(work)
    members = {"knn": {"method": "knn", "top_k": 5}}
    options = {"members": members, "context": [{"views": ["efficientnet_lite0"]}], "smoothing": [],
               "query_neighbours": [], "candidates": []}  # every variant reads a view
    method, log, path = train_model(TrainRunConfig(
        work_dir=work, embed=embed, genes=GeneConfig(n_genes=20, min_spot_fraction=0.0), method="ensemble",
        method_options={"ensemble": options}, train_samples=["S1", "S2", "S3"], out=tmp_path / "ens.pt", n_top=5,
        reliability=False, transcriptome_threshold=None))
    tried = sorted(log.selection["context_inner_pearson"]["knn"])  # the context's, and the other embedded view
    assert tried == ['{"views": ["efficientnet_lite0"]}', '{"views": ["tiles"]}']
    back = load_method(path)
    assert back.reads_views == log.selection["context"]["knn"]["views"]
    # the card keeps the encoder views the saved model reads, not every one it was given to choose from
    assert set(back.card.view_encoders) == set(back.reads_views) - {"tiles"}
    spots = load_spots(ws, ["S3"], PatchSpec(), embed, back.panel, with_targets=False, views=back.reads_views)
    out = predict_slide(back, None, tmp_path / "pred", spots_from=ws.sample_path("S3"), runtime="torch")
    np.testing.assert_allclose(ad.read_h5ad(out).X, method.predict(spots).expression, rtol=1e-3, atol=1e-3)


def test_a_run_loads_the_views_its_methods_and_ensemble_candidates_may_read(tmp_path):
    candidates = [{}, {"views": ["tiles"]}, {"context_field": True, "views": ["efficientnet_lite1"]}]
    cfg = BenchmarkConfig(work_dir=tmp_path, methods=["knn", "ensemble"],
                          method_options={"knn": {"views": ["efficientnet_lite2"]},
                                          "ensemble": {"members": {"ridge": {"method": "ridge"}},
                                                       "context": candidates}})
    assert cfg.needs_views() == ["efficientnet_lite2", "tiles", "field", "efficientnet_lite1"]
    # the ensemble is given the views the run embeds, and tries each; a method naming its own views is not
    embedded = cfg.model_copy(update={"embed": EmbedConfig(views=["adapted", "tiles"])})
    assert embedded.options_for("ensemble")["view_variants"] == ["adapted", "tiles"]
    assert "view_variants" not in embedded.options_for("knn")
    assert embedded.needs_views() == ["efficientnet_lite2", "tiles", "field", "efficientnet_lite1", "adapted"]
    pinned = {"knn": cfg.method_options["knn"], "ensemble": cfg.method_options["ensemble"] | {"view_variants": []}}
    assert embedded.model_copy(update={"method_options": pinned}).needs_views() == \
        ["efficientnet_lite2", "tiles", "field", "efficientnet_lite1"]
    with pytest.raises(He2stError, match="context_neighbours/context_field/views on its members"):
        create_method("ensemble", views=["tiles"])
