"""Ready-made models through the command line: the registry's table and entries, hosted weights checked
against their sha256 (a local file:// URL), and a recipe built on first use by ``he2st predict --model NAME``
(a test-only entry: knn on three synthetic legacy-ST sections of three patients, a tiny random ViT)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from in_process import run_cli
from synthetic import tissue_image, write_pyramid, write_st_section

from he2st.data.embeddings import DEFAULT_ENCODER
from he2st.data.genes import GenePanel
from he2st.methods import create_method, read_card
from he2st.version import __version__
from he2st.workflows import model_zoo
from he2st.workflows.model_cache import STAMP, cache_state, models_home
from he2st.workflows.model_zoo import MODELS, HostedFile, ModelEntry, Recipe, get_model

GENES = [f"G{i}" for i in range(20)]
PATIENTS = {"S1": "P1", "S2": "P2", "S3": "P3"}


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv("HE2ST_MODELS_DIR", str(folder))
    return folder


def test_the_registry_lists_each_model_and_says_where_not_to_use_it(models_dir, tmp_path):
    listing = run_cli("models", "list")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split()[:3] == ["name", "source", "cache"]
    assert any(row.split()[:4] == ["her2st-breast", "recipe", "not", "cached"] for row in rows)

    shown = run_cli("models", "show", "her2st-breast")
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.strip().split(": ", 1) for line in shown.stdout.splitlines())
    assert "HER2+ breast cancer" in fields["training data"] and "legacy ST" in fields["training data"]
    assert "clinical" in fields["not for"] and "other tissues" in fields["not for"]
    assert fields["recipe sha256"] == get_model("her2st-breast").recipe.digest()
    assert fields["cache"] == f"not cached: {models_dir / 'her2st-breast'}"

    # the shipped recipe is `he2st train`'s default method and encoder on every imaged her2st section, seeded
    entry = get_model("her2st-breast")
    train = entry.recipe.train_config(tmp_path / "w", tmp_path / "w" / "model.pt")
    assert (entry.recipe.dataset, entry.recipe.sections, train.method, train.seed) == ("her2st", None, "ensemble", 0)
    assert train.embed.encoder == DEFAULT_ENCODER and train.wants_reliability({"A1": "A", "B4": "B", "C2": "C"})
    data = entry.recipe.prepare_config(tmp_path / "w").data
    assert (data.dataset, data.sections, data.samples) == ("her2st", None, [])  # None: every imaged section

    unknown = run_cli("models", "show", "her2st-brest")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "did you mean 'her2st-breast'" in unknown.stderr
    assert models_home() == models_dir and not models_dir.exists()  # listing and showing write nothing


def test_an_entry_has_one_source_and_a_recipe_leaves_paths_to_the_cache():
    hosted = HostedFile(url="file:///m.pt", sha256="0" * 64)
    with pytest.raises(ValueError, match="either a recipe or hosted files"):
        ModelEntry(name="x", description="d", trained_on="t", not_for="n", recipe=Recipe(), files=(hosted,))
    with pytest.raises(ValueError, match="either a recipe or hosted files"):
        ModelEntry(name="x", description="d", trained_on="t", not_for="n")
    with pytest.raises(ValueError, match="may not set out, work_dir"):
        Recipe(settings={"out": "/elsewhere/m.pt", "work_dir": "/tmp"})
    with pytest.raises(ValueError, match="not a safe name"):
        ModelEntry(name="../up", description="d", trained_on="t", not_for="n", recipe=Recipe())
    assert Recipe(seed=1).digest() != Recipe().digest() == Recipe(method="ensemble").digest()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    from he2st.data.spots import SpotSet

    n = 60
    spots = SpotSet(sample_ids=np.repeat(np.array(["s1", "s2"], dtype=object), n // 2),
                    barcodes=np.arange(n).astype(str).astype(object), features=rng.normal(size=(n, 8)).astype(np.float32),
                    coords_um=rng.uniform(0, 900, (n, 2)), genes=GENES[:4],
                    targets=rng.gamma(2.0, 1.0, (n, 4)).astype(np.float32))
    method = create_method("ridge", pca_components=4)
    method.panel = GenePanel(genes=GENES[:4])
    method.fit(spots)
    return method.save(tmp_path_factory.mktemp("hosted") / "ridge.pt")


def hosted_entry(name: str, checkpoint: Path, sha256: str) -> ModelEntry:
    return ModelEntry(name=name, description="a tiny ridge", trained_on="random spots", not_for="anything",
                      files=(HostedFile(url=checkpoint.as_uri(), sha256=sha256),))


def test_hosted_weights_are_cached_only_with_their_sha256(models_dir, tiny_checkpoint, monkeypatch):
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    monkeypatch.setitem(MODELS, "tiny-ridge", hosted_entry("tiny-ridge", tiny_checkpoint, digest))
    monkeypatch.setitem(MODELS, "tiny-bad", hosted_entry("tiny-bad", tiny_checkpoint, "f" * 64))

    bad = run_cli("models", "fetch", "tiny-bad")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert f"has sha256 {digest}, not the registered {'f' * 64}" in bad.stderr
    assert not (models_dir / "tiny-bad").exists()
    assert not [p for p in models_dir.rglob("*") if p.is_file() and ".he2st-" not in str(p)]  # no partial download

    good = run_cli("models", "fetch", "tiny-ridge")
    assert good.returncode == 0, good.stderr
    cached = models_dir / "tiny-ridge" / "model.pt"
    assert good.stdout.splitlines()[-1] == f"tiny-ridge: {cached}"
    assert cached.read_bytes() == tiny_checkpoint.read_bytes()
    assert json.loads((cached.parent / STAMP).read_text())["fingerprint"] == {"files": f"model.pt:{digest}"}
    shown = run_cli("models", "show", "tiny-ridge")
    assert "cache: cached:" in shown.stdout and "model: ridge (he2st" in shown.stdout

    cached.write_bytes(b"damaged")  # a damaged copy is never used: it is downloaded again
    again = run_cli("models", "fetch", "tiny-ridge")
    assert again.returncode == 0 and "downloading" in again.stdout
    assert cached.read_bytes() == tiny_checkpoint.read_bytes()
    assert run_cli("models", "build", "tiny-ridge").stderr.startswith("error: model tiny-ridge has no recipe")


@pytest.fixture(scope="module")
def synthetic_recipe(tmp_path_factory) -> Recipe:
    """knn on three synthetic legacy-ST sections (one patient each, 1 µm/px), read by a seeded tiny ViT."""
    import torch

    from he2st.encoders import create

    root = tmp_path_factory.mktemp("recipe")
    samples = []
    for i, (sid, pid) in enumerate(PATIENTS.items()):
        files = write_st_section(root / sid, pitch_px=200, genes=GENES, seed=i)
        samples.append({"reader": "st", "sample_id": sid, "patient_id": pid, "path": str(files["counts"]),
                        "spots_file": str(files["spots"]), "image": str(files["image"])})
    torch.manual_seed(0)
    weights = root / "test_vit.pth"
    torch.save(create("test_vit", pretrained=False).backbone.state_dict(), weights)
    return Recipe(dataset=None, samples=tuple(samples), method="knn", settings={
        "embed": {"encoder": "test_vit", "weights": str(weights), "num_workers": 0, "runtime": "torch"},
        "genes": {"n_genes": 10, "min_spot_fraction": 0.0}, "n_top": 5, "method_options": {"knn": {"top_k": 5}}})


def test_a_failed_build_leaves_neither_its_work_folder_nor_a_model(models_dir, synthetic_recipe, monkeypatch):
    """A build that fails in training (here: an error raised by the fit) removes the samples it prepared in
    the cache's work folder, and no model folder appears: a failed build leaves nothing half made."""
    from he2st.errors import He2stError
    from he2st.workflows import model_cache, train

    def fail(*_args, **_kwargs):
        raise He2stError("the fit failed")

    monkeypatch.setattr(train, "train_model", fail)
    entry = ModelEntry(name="tiny-fail", description="fails", trained_on="3 synthetic sections", not_for="anything",
                       recipe=synthetic_recipe)
    with pytest.raises(He2stError, match="the fit failed"):
        model_cache._build(entry, models_dir / "tiny-fail", models_dir, lambda _line: None)
    assert not (models_dir / ".work" / "tiny-fail").exists() and not (models_dir / "tiny-fail").exists()


def test_predict_builds_a_recipe_on_first_use_and_refuses_a_changed_one(models_dir, synthetic_recipe, tmp_path,
                                                                        monkeypatch):
    entry = ModelEntry(name="tiny-knn", description="knn on synthetic sections", trained_on="3 synthetic sections",
                       not_for="real tissue", recipe=synthetic_recipe)
    monkeypatch.setitem(MODELS, "tiny-knn", entry)
    slide = write_pyramid(tmp_path / "new.tif", tissue_image(1200, 1200, seed=3), 0.5)

    def predict(out: str):
        return run_cli("predict", "--model", "tiny-knn", "--slide", slide, "--out", tmp_path / out, "--device", "cpu",
                       "--no-maps", "--set", "runtime=torch")

    from PIL import Image

    jpeg = tmp_path / "no_scale.jpg"  # a JPEG records no pixel size: refused before the model is built
    Image.fromarray(tissue_image(300, 300, seed=4)).save(jpeg)
    unscaled = run_cli("predict", "--model", "tiny-knn", "--slide", jpeg, "--out", tmp_path / "none")
    assert unscaled.returncode == 2 and "pass --mpp" in unscaled.stderr and "building" not in unscaled.stdout
    assert not (models_dir / "tiny-knn").exists()
    first = predict("first")
    assert first.returncode == 0, first.stderr
    assert f"building tiny-knn: {synthetic_recipe.summary()}" in first.stdout
    prediction = ad.read_h5ad(tmp_path / "first" / "new.h5ad")
    assert prediction.n_obs > 10 and prediction.n_vars == 10 and np.isfinite(prediction.X).all()
    checkpoint = models_dir / "tiny-knn" / "model.pt"
    card = read_card(checkpoint)
    assert card.method == "knn" and sorted(card.training_samples.items()) == sorted(PATIENTS.items())
    assert card.command == "he2st models build tiny-knn" and card.reliability["units"]  # 3 patients: estimated
    stamp = json.loads((checkpoint.parent / STAMP).read_text())
    assert stamp["fingerprint"] == entry.fingerprint() and stamp["recipe"]["method"] == "knn"
    assert not (models_dir / ".work" / "tiny-knn").exists()  # the build's work folder goes once it succeeds

    second = predict("second")  # cached: used as it is
    assert second.returncode == 0 and "building" not in second.stdout
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "second" / "new.h5ad").X, prediction.X)

    with monkeypatch.context() as patched:  # another he2st version: stale, said so
        patched.setattr(model_zoo, "__version__", "9.9.9")
        assert cache_state(entry, models_dir) == f"stale (built by he2st {__version__})"
    changed = entry.model_copy(update={"recipe": synthetic_recipe.model_copy(update={"seed": 1})})
    monkeypatch.setitem(MODELS, "tiny-knn", changed)
    refused = predict("refused")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "differs from its entry (another recipe); rebuild it with `he2st models build tiny-knn`" in refused.stderr
    assert f"--model {checkpoint}" in refused.stderr and not (tmp_path / "refused").exists()
    assert "stale (another recipe)" in run_cli("models", "list").stdout

    rebuilt = run_cli("models", "build", "tiny-knn")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.splitlines()[-1].startswith("built tiny-knn in ")
    assert cache_state(changed, models_dir) == "cached"
    assert predict("rebuilt").returncode == 0
    by_path = run_cli("predict", "--model", checkpoint, "--slide", slide, "--out", tmp_path / "by_path", "--device",
                      "cpu", "--no-maps", "--set", "runtime=torch")
    assert by_path.returncode == 0, by_path.stderr  # the checkpoint path works as before


@pytest.mark.parametrize("xdg", ["", "relative/cache", "  "])
def test_caches_ignore_an_empty_or_relative_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, xdg: str) -> None:
    """An empty or relative $XDG_CACHE_HOME would put the caches in the folder the command runs from."""
    from he2st.data.datasets import data_home
    from he2st.encoders.export import cache_dir
    from he2st.workflows.model_cache import models_home

    for name in ("HE2ST_DATA_DIR", "HE2ST_MODELS_DIR", "HE2ST_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    home = Path.home() / ".cache" / "he2st"
    assert (data_home(), models_home(), cache_dir()) == (home / "data", home / "models", home)
    monkeypatch.setenv("XDG_CACHE_HOME", "~/elsewhere")
    assert data_home() == Path.home() / "elsewhere" / "he2st" / "data"
