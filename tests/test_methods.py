"""Methods on synthetic spots: they learn the signal, refuse unsafe checkpoints, read spatial context, and the
ensemble's inner folds (the contract every method shares is in test_method_conformance.py)."""

from __future__ import annotations

import json
import operator
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from synthetic import linear_spots

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods import create_method, load_method
from he2st.methods.base import TrainLog
from he2st.methods.layers.features import centred_within_samples
from he2st.methods.training import TrainConfig, fit_minibatches
from he2st.stats import one_standard_error_choice

FAST = {"train": {"epochs": 8, "batch_size": 64, "patience": 3, "lr": 1e-3}}
OPTIONS = {"bleep": FAST | {"ensemble": 2}, "bleep_faithful": FAST, "mlp": FAST, "ridge": {"pca_components": 8},
           "ridge_cv": {"pca_components": 8, "alphas": [1.0, 100.0]}, "knn": {"top_k": 5}}


def fitted(name: str) -> tuple:
    spots = linear_spots()
    train, val, test = spots.subset(np.arange(0, 160)), spots.subset(np.arange(160, 200)), spots.subset(np.arange(200, 240))
    method = create_method(name, **OPTIONS[name])
    method.panel = GenePanel(genes=spots.genes)
    method.fit(train, val)
    return method, test


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fit_learns_the_signal(name):
    method, test = fitted(name)
    pred = method.predict(test.without_expression())
    r = [np.corrcoef(pred.expression[:, j], test.targets[:, j])[0, 1] for j in range(12)]
    assert np.nanmean(r) > 0.3, f"{name} learned nothing: {np.nanmean(r):.3f}"


def test_tampered_checkpoint_with_pickled_object_is_refused(tmp_path):
    method, _ = fitted("ridge")
    path = method.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    payload["config"] = Evil()
    with open(tmp_path / "evil.pt", "wb") as fh:
        torch.save(payload, fh, pickle_module=pickle)
    with pytest.raises(He2stError, match="refusing checkpoint"):
        load_method(tmp_path / "evil.pt")


def test_checkpoint_of_an_older_layout_is_refused_in_one_line(tmp_path):
    """An mlp saved before its principal axes moved into the scaler held a frozen projection as net.0."""
    method, _ = fitted("mlp")
    path = method.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["state"]["net.9.weight"] = torch.zeros(2, 2)
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(He2stError, match="weights do not fit this he2st version.*re-train") as info:
        load_method(tmp_path / "old.pt")
    assert "\n" not in str(info.value)


def test_ridge_probe_also_predicts_cell_type_proportions_when_trained_on_them(tmp_path):
    """The linear baseline for CarHE's cell-type head: proportions from the same PCA features."""
    spots = linear_spots()
    rng = np.random.default_rng(1)
    logits = spots.features[:, :4] @ rng.normal(size=(4, 5))
    props = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    props[3] = np.nan  # deconvolution tables have unusable rows; they are left out of the fit
    spots.extras["celltype_major"] = props.astype(np.float32)
    train, test = spots.subset(np.arange(0, 200)), spots.subset(np.arange(200, 240))
    method = create_method("ridge", pca_components=8)
    method.panel = GenePanel(genes=spots.genes)
    method.fit(train)
    pred = method.predict(test.without_expression()).extras["celltype_major"]
    assert pred.shape == (40, 5) and (pred >= 0).all()
    np.testing.assert_allclose(pred.sum(axis=1), 1, atol=1e-5)
    r = [np.corrcoef(pred[:, j], test.extras["celltype_major"][:, j])[0, 1] for j in range(5)]
    assert np.mean(r) > 0.5
    back = load_method(method.save(tmp_path / "ridge.pt"))
    np.testing.assert_array_equal(back.predict(test.without_expression()).extras["celltype_major"], pred)
    off = create_method("ridge", pca_components=8, celltype_key=None)
    off.panel = method.panel
    off.fit(train)
    assert not off.predict(test.without_expression()).extras


def test_model_refuses_features_from_another_encoder():
    method, test = fitted("knn")
    test.features = np.zeros((len(test), 32), np.float32)
    with pytest.raises(He2stError, match="16-d image features"):
        method.predict(test)


def test_unknown_method_name():
    with pytest.raises(He2stError, match="unknown method"):
        create_method("bleeep")


def test_faithful_bleep_defaults_match_the_paper():
    cfg = create_method("bleep_faithful").config
    assert (cfg.loss, cfg.temperature, cfg.learn_temperature, cfg.negatives, cfg.weighting, cfg.top_k) == (
        "bleep_soft", 1.0, False, "batch", "average", 50)
    assert cfg.expression_encoder == "projection" and cfg.projection_dim == 256 and cfg.train.lr == 1e-3


def test_bleep_retrieval_is_the_average_of_the_k_nearest_reference_profiles():
    method, test = fitted("bleep_faithful")
    q = method.embed_images(test)
    bank = method.bank
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ bank.embeddings.T
    top = np.argsort(-sims, axis=1)[:, :50]
    expected = bank.expression[top].mean(axis=1)
    np.testing.assert_allclose(method.predict(test).expression, expected, rtol=1e-5, atol=1e-5)


def test_end_to_end_finetuning_path_with_tiny_encoder():
    spots = linear_spots(n=48)
    rng = np.random.default_rng(0)
    spots.patches = rng.integers(0, 255, size=(48, 32, 32, 3), dtype=np.uint8)
    method = create_method("bleep", finetune_encoder=True, encoder="test_vit", encoder_pretrained=False, ensemble=1,
                           train={"epochs": 2, "batch_size": 16})
    method.panel = GenePanel(genes=spots.genes)
    log = method.fit(spots.subset(np.arange(32)), spots.subset(np.arange(32, 48)))
    assert len(log.curves["train_loss"]) >= 1
    params = list(method.nets[0].encoder.parameters())
    assert all(p.requires_grad for p in params)
    assert method.predict(spots.subset(np.arange(32, 48))).expression.shape == (16, 12)


def test_an_ensemble_member_trained_end_to_end_gets_the_patches_and_its_say_from_the_inner_folds():
    """A member with ``finetune_encoder`` makes the ensemble load raw patches (as a run asks ``uses_patches``),
    is fitted on every inner fold like the others, and keeps the weight the stacking gives it."""
    from he2st.workflows.config import BenchmarkConfig

    e2e = {"method": "bleep", "finetune_encoder": True, "encoder": "test_vit", "encoder_pretrained": False,
           "ensemble": 1, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}
    options = {"members": {"ridge": {"method": "ridge"}, "e2e": e2e}, "candidates": [], "context": [{}],
               "smoothing": [], "query_neighbours": [0]}
    assert not create_method("ensemble").uses_patches and create_method("ensemble", **options).uses_patches
    assert create_method("ensemble", candidates=[e2e]).uses_patches  # a candidate trained end to end, too
    assert BenchmarkConfig(methods=["ensemble"], method_options={"ensemble": options}).needs_patches()
    assert not BenchmarkConfig(methods=["ensemble"]).needs_patches()

    spots = linear_spots(n=60)
    spots.patches = np.random.default_rng(0).integers(0, 255, size=(60, 32, 32, 3), dtype=np.uint8)
    method = create_method("ensemble", **options)
    method.panel = GenePanel(genes=spots.genes)
    selection = method.fit(spots.subset(np.arange(48))).selection
    assert len(selection["inner_pearson"]["e2e"]) == 3 and "e2e" not in selection["dropped"]
    assert list(method.fitted) == ["ridge", "e2e"] and method.fitted["e2e"].nets[0].encoder is not None
    assert method.predict(spots.subset(np.arange(48, 60))).expression.shape == (12, 12)


def test_retrieval_can_return_more_genes_than_the_panel():
    method, test = fitted("bleep")
    train = linear_spots().subset(np.arange(0, 200))
    rng = np.random.default_rng(1)
    full = np.hstack([train.targets, rng.random((200, 30000), dtype=np.float32)])
    genes = train.genes + [f"EXTRA{i}" for i in range(30000)]
    method.bank = method.reference_bank(train.targets, train.genes, list(train.sample_ids),
                                        output_expression=full, output_genes=genes)
    pred = method.predict(test)
    assert pred.expression.shape == (40, 30012) and pred.genes[-1] == "EXTRA29999"
    assert set(pred.uncertainty) == {"best_similarity", "dispersion"}


def two_patient_spots(n: int = 240) -> tuple[SpotSet, SpotSet, dict[str, str]]:
    spots = linear_spots(n)
    return spots.subset(np.arange(0, 200)), spots.subset(np.arange(200, n)), {"s1": "P1", "s2": "P2", "s3": "P3"}


def test_ensemble_weights_come_from_inner_folds_over_training_patients_and_roundtrip(tmp_path):
    train, test, _ = two_patient_spots()
    train = train.subset(np.isin(train.sample_ids, ["s1", "s2"]))
    members = {"knn": {"method": "knn", "top_k": 5}, "ridge": {"method": "ridge_cv", "pca_components": 8},
               "mlp": {"method": "mlp"} | FAST, "carhe": {"method": "carhe", "celltypes_from": "extras"}}
    method = create_method("ensemble", members=members)
    method.panel = GenePanel(genes=train.genes)
    method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2"}})
    log = method.fit(train)
    sel = log.selection
    assert sel["inner_folds"] == ["P1", "P2"]  # one inner fold per training patient, never the test one
    assert "carhe" in sel["dropped"] and "proportions" in sel["dropped"]["carhe"]  # reported, not fatal
    assert set(sel["weights"]) == {"knn", "ridge", "mlp"} and all(len(v) == 2 for v in sel["inner_pearson"].values())
    assert (method.combination.weights >= 0).all() and method.combination.weights.sum() > 0
    assert sel["combination"] == "equal"  # two held-out patients are too few to fit weights on ('auto')
    assert set(sel["member_seconds"]) == set(members) and min(sel["member_seconds"].values()) >= 0  # failed ones too
    pred = method.predict(test.without_expression())
    r = [np.corrcoef(pred.expression[:, j], test.targets[:, j])[0, 1] for j in range(12)]
    assert np.nanmean(r) > 0.3
    back = load_method(method.save(tmp_path / "ens.pt"))
    np.testing.assert_allclose(back.predict(test.without_expression()).expression, pred.expression, rtol=1e-5,
                               atol=1e-5)


def test_ensemble_does_not_refit_a_member_without_weight(monkeypatch):
    """A member the stacking gives no weight in any gene changes no prediction: it is not refitted, and the
    selection says why. On a runner its refit, which the selection could not change, ran beside the inner
    fits; it is let go, and the model and selection are the serial fit's."""
    from he2st.methods import stacking
    from he2st.methods.inner_tasks import inner_tasks

    train, test, _ = two_patient_spots()
    members = {"knn": {"method": "knn", "top_k": 5}, "ridge": {"method": "ridge_cv", "pca_components": 8}}
    monkeypatch.setattr(stacking, "_nnls", lambda X, y: np.eye(X.shape[1])[0])  # all on the first
    maps: list[int] = []

    def runner(task, arguments):
        maps.append(len(arguments))
        return [task(*a) for a in arguments]

    def fitted(run):
        method = create_method("ensemble", members=members, min_selection_folds=2, context=[], smoothing=[],
                               candidates=[])
        method.panel = GenePanel(genes=train.genes)
        method.card = method.card.model_copy(
            update={"training_samples": {s: f"P{s[1:]}" for s in set(train.sample_ids)}})
        with inner_tasks(run):
            return method, method.fit(train).selection

    method, sel = fitted(None)
    assert sel["combination"] == "global" and list(method.fitted) == ["knn"]
    assert "left out" in sel["dropped"]["ridge"] and list(sel["weights"]) == ["knn"]
    query = test.without_expression()
    assert method.predict(query).expression.shape == (len(test), len(train.genes))
    pooled, sel_p = fitted(runner)
    assert maps == [len(sel["inner_folds"]) * 2 + 2]  # both members on every inner fold and both refits, in one map
    assert list(pooled.fitted) == ["knn"] and sel_p["dropped"] == sel["dropped"]
    np.testing.assert_array_equal(pooled.predict(query).expression, method.predict(query).expression)


def test_ensemble_gives_each_member_its_say_within_the_predicted_sample():
    """A refitted member shown a new slide may spread its predictions far wider than on the inner folds.
    Standardised within the predicted sample ('sample'), it keeps its say: the combination's pattern does
    not move; scaled once by its inner spread ('inner'), it takes over."""
    train, test, _ = two_patient_spots()
    train = train.subset(np.isin(train.sample_ids, ["s1", "s2"]))
    query = test.without_expression()
    members = {"knn": {"method": "knn", "top_k": 5, "context_neighbours": 0},
               "ridge": {"method": "ridge_cv", "pca_components": 8, "context_neighbours": 0}}

    def pattern(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(0)) / x.std(0)

    for scale_within, kept in (("sample", True), ("inner", False)):
        method = create_method("ensemble", members=members, scale_within=scale_within)
        method.panel = GenePanel(genes=train.genes)
        method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2"}})
        assert method.fit(train).selection["scale_within"] == scale_within
        before = method.predict(query).expression
        ridge = method.fitted["ridge"]
        own = ridge.predict
        ridge.predict = lambda spots, own=own: replace(own(spots), expression=own(spots).expression * 10 + 3)
        after = method.predict(query).expression
        assert np.allclose(pattern(after), pattern(before), atol=1e-4) == kept, scale_within


def test_validation_follows_the_prediction_pearson():
    """Neural methods stop early on the mean per-gene Pearson of their own predictions for validation spots."""
    method = create_method("mlp", **OPTIONS["mlp"], epochs_by="validation")
    method.panel = GenePanel(genes=linear_spots().genes)
    spots = linear_spots()
    log = method.fit(spots.subset(np.arange(0, 160)), spots.subset(np.arange(160, 200)))
    curve = log.curves["val_pearson"]
    assert log.best_epoch == int(np.argmax(curve)) and max(curve) > 0.3


def test_gains_below_min_delta_keep_their_weights_but_do_not_restart_the_patience():
    """A validation curve that creeps up by 1e-4 an epoch after its last real gain (as on a large training
    set): with ``min_delta`` 1e-3 the patience runs out 3 epochs after that gain and the last, slightly better
    epoch's weights are kept; with ``min_delta`` 0 every creep restarts the patience and training runs on."""
    scores = [0.1, 0.2, 0.3] + [0.3 + 1e-4 * k for k in range(1, 20)]

    def run(min_delta: float) -> tuple[TrainLog, list[float], float]:
        module = torch.nn.Linear(1, 1, bias=False)
        curve, weights = iter(scores), []

        def validate() -> float:
            weights.append(module.weight.item())
            return next(curve)

        config = TrainConfig(epochs=len(scores), batch_size=2, patience=3, min_delta=min_delta, grad_clip=None)
        log = fit_minibatches(module, 2, lambda idx: module.weight.sum(), config, seed=0, validate=validate)
        return log, weights, module.weight.item()

    log, weights, kept = run(1e-3)
    assert len(log.curves["val_pearson"]) == 6 and log.best_epoch == 5
    assert kept == weights[5] != weights[2]
    log, _, _ = run(0.0)
    assert len(log.curves["val_pearson"]) == len(scores) and log.best_epoch == len(scores) - 1


def test_mlp_chooses_its_epochs_on_held_out_training_patients():
    """The MLP's epoch count comes from the mean validation curve of inner folds that each hold out
    training patients; the final fit then uses all training spots for that many epochs."""
    spots = linear_spots()
    method = create_method("mlp", **OPTIONS["mlp"])
    method.panel = GenePanel(genes=spots.genes)
    method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2", "s3": "P2"}})
    log = method.fit(spots.subset(np.arange(0, 200)))
    curve = log.curves["inner_val_pearson"]
    assert log.best_epoch == int(np.argmax(curve)) and max(curve) > 0.3
    assert len(log.curves["train_loss"]) == log.best_epoch + 1  # the final fit: exactly the chosen epochs


def with_field(spots: SpotSet, seed: int = 1) -> SpotSet:
    """The spots with context-field features (a noisy copy of their own: tissue around a spot resembles it)."""
    rng = np.random.default_rng(seed)
    return replace(spots, views={"field": (spots.features + rng.normal(size=spots.features.shape)).astype(np.float32)})


def test_neighbour_context_is_the_mean_of_the_nearest_spots_of_the_same_sample():
    from he2st.methods.layers.context import neighbour_mean

    spots = linear_spots(60)
    mean = neighbour_mean(spots.features, spots.coords_um, spots.sample_ids, 3)
    for i in (0, 25, 59):
        same = np.flatnonzero(spots.sample_ids == spots.sample_ids[i])
        same = same[same != i]
        nearest = same[np.argsort(np.linalg.norm(spots.coords_um[same] - spots.coords_um[i], axis=1))[:3]]
        np.testing.assert_allclose(mean[i], spots.features[nearest].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["knn", "ridge_cv", "mlp"])
def test_every_method_reads_spatial_context_as_features(name, tmp_path):
    """Context options widen any method's input ([spot | neighbour mean | field]) and travel with its checkpoint."""
    spots = with_field(linear_spots())
    train, test = spots.subset(np.arange(0, 200)), spots.subset(np.arange(200, 240))
    method = create_method(name, **OPTIONS[name], context_neighbours=4, context_field=True)
    method.panel = GenePanel(genes=spots.genes)
    method.fit(train.subset(np.arange(160)), train.subset(np.arange(160, 200)))
    assert method.feature_dim == 3 * 16 and method.halo_hops[-1] == 4
    pred = method.predict(test.without_expression()).expression
    back = load_method(method.save(tmp_path / "m.pt"))
    np.testing.assert_allclose(back.predict(test.without_expression()).expression, pred, rtol=1e-5, atol=1e-6)
    with pytest.raises(He2stError, match="context field"):
        method.predict(replace(test, views={}))
    with pytest.raises(He2stError, match="expects 16-d"):
        method.predict(replace(test, features=test.features[:, :8], views={"field": test.views["field"][:, :8]}))


@pytest.mark.parametrize("name", ["knn", "ridge_cv"])
def test_an_empty_validation_set_takes_the_context_too(name):
    """Methods that pool validation spots with training ones fit with an empty validation set as without one,
    the context their features carry included."""
    spots = with_field(linear_spots())
    train, test = spots.subset(np.arange(0, 200)), spots.subset(np.arange(200, 240))
    predictions = []
    for val in (None, train.subset(np.zeros(len(train), bool))):
        method = create_method(name, **OPTIONS[name], context_neighbours=4, context_field=True)
        method.panel = GenePanel(genes=spots.genes)
        method.fit(train, val)
        predictions.append(method.predict(test).expression)
    np.testing.assert_array_equal(predictions[1], predictions[0])


def test_ensemble_chooses_each_members_context_on_inner_folds():
    train, _, _ = two_patient_spots()
    train = with_field(train.subset(np.isin(train.sample_ids, ["s1", "s2"])))
    members = {"knn": {"method": "knn", "top_k": 5}, "plain_knn": {"method": "knn", "top_k": 5, "context_neighbours": 0},
               "bleep": {"method": "bleep", "ensemble": 1, "context_neighbours": 0} | FAST}
    # let two inner folds choose; smoothing is left out here (its own test below)
    method = create_method("ensemble", members=members, min_selection_folds=2, smoothing=[], candidates=[])
    method.panel = GenePanel(genes=train.genes)
    method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2"}})
    sel = method.fit(train).selection
    tried = sel["context_inner_pearson"]["knn"]  # each variant's score on each inner fold
    assert len(tried) == 4 and all(len(v) == 2 for v in tried.values())
    assert len(sel["context_inner_pearson"]["plain_knn"]) == 1 and sel["context"]["plain_knn"] == {}  # pinned
    # the member as configured (no context) unless a variant is ahead on every inner fold
    rule = one_standard_error_choice(tried, "{}")
    assert sel["context"]["knn"] == json.loads(rule)
    chosen = method.fitted["knn"].config
    assert {k: getattr(chosen, k) for k in json.loads(rule)} == json.loads(rule)
    # a retrieval member is trained once per inner fold and queried with and without neighbour averaging;
    # its own default (6 neighbours) is the one kept unless no averaging is ahead on both folds
    queried = sel["context_inner_pearson"]["bleep"]
    assert sorted(queried) == ['{"query_neighbours": 0}', '{"query_neighbours": 6}']
    kept = json.loads(one_standard_error_choice(queried, '{"query_neighbours": 6}'))
    assert method.fitted["bleep"].config.query_neighbours == sel["context"]["bleep"]["query_neighbours"] == \
        kept["query_neighbours"]
    with pytest.raises(He2stError, match="on its members"):
        create_method("ensemble", context_neighbours=6)


def test_spatial_smoothing_averages_neighbouring_predictions_and_the_ensemble_tries_it():
    """``smooth_neighbours`` averages each prediction with its k nearest spots' of the same slide (widening the
    chunk halo by one hop); the ensemble tries it on every member that does not pin it, with no refit."""
    spots = linear_spots()
    train, test = spots.subset(np.arange(0, 200)), spots.subset(np.arange(200, 240))
    plain = create_method("ridge_cv", **OPTIONS["ridge_cv"])
    plain.panel = GenePanel(genes=spots.genes)
    plain.fit(train)
    raw = plain.predict(test.without_expression()).expression
    plain.config = plain.config.model_copy(update={"smooth_neighbours": 3})
    smooth = plain.predict(test.without_expression()).expression
    assert plain.halo_hops == (3,) and "smooth_neighbours" in type(plain).query_options
    i, same = 0, np.flatnonzero(test.sample_ids == test.sample_ids[0])
    nearest = same[np.argsort(np.linalg.norm(test.coords_um[same] - test.coords_um[i], axis=1))[:4]]
    np.testing.assert_allclose(smooth[i], raw[nearest].mean(0), rtol=1e-5, atol=1e-5)
    train2, _, _ = two_patient_spots()
    members = {"ridge": {"method": "ridge_cv", **OPTIONS["ridge_cv"]},
               "pinned": {"method": "ridge_cv", **OPTIONS["ridge_cv"], "smooth_neighbours": 0}}
    method = create_method("ensemble", members=members, min_selection_folds=2, context=[], smoothing=[0, 4], candidates=[])
    method.panel = GenePanel(genes=train2.genes)
    method.card = method.card.model_copy(update={"training_samples": {s: f"P{s[1:]}" for s in set(train2.sample_ids)}})
    sel = method.fit(train2).selection
    assert sorted(sel["context_inner_pearson"]["ridge"]) == ['{"smooth_neighbours": 0}', '{"smooth_neighbours": 4}']
    assert len(sel["context_inner_pearson"]["pinned"]) == 1
    assert method.fitted["ridge"].config.smooth_neighbours == sel["context"]["ridge"].get("smooth_neighbours", 0)


def stained_samples(levels: list[float], stains: list[float], n: int = 60, seed: int = 0) -> SpotSet:
    """One feature carries a spot's biology plus its sample's stain; each sample's expression sits at its own
    level. Across samples the level falls as the stain rises, so a fit over pooled spots learns the opposite
    of the within-sample slope (Simpson's paradox)."""
    rng = np.random.default_rng(seed)
    k = len(levels)
    biology = rng.normal(size=(k * n, 1))
    sample = np.repeat(np.arange(k), n)
    features = np.hstack([biology + np.asarray(stains)[sample, None], 0.1 * rng.normal(size=(k * n, 3))])
    targets = biology * np.array([[1.0, 0.5]]) + np.asarray(levels)[sample, None] + 0.05 * rng.normal(size=(k * n, 2))
    return SpotSet(sample_ids=np.array([f"s{i}" for i in sample], dtype=object),
                   barcodes=np.arange(k * n).astype(str).astype(object), features=features.astype(np.float32),
                   coords_um=rng.uniform(0, 2000, size=(k * n, 2)), genes=["G0", "G1"],
                   targets=targets.astype(np.float32))


def test_within_sample_learns_the_within_sample_relation_not_the_levels_between_samples():
    """``within_sample``: each training sample's targets are centred on the common mean before the fit, so a
    sample's level (depth, capture, batch) is not learned from its stain; the held-out sample's own spots
    are then ranked as their biology says."""
    train = stained_samples(levels=[6.0, 2.0, -2.0, -6.0], stains=[-3.0, -1.0, 1.0, 3.0])
    test = stained_samples(levels=[0.0], stains=[0.0], seed=1)
    scores = {}
    for within in (False, True):
        method = create_method("ridge", within_sample=within)
        method.panel = GenePanel(genes=train.genes)
        method.fit(train.subset(np.arange(200)), train.subset(np.arange(200, 240)))
        predicted = method.predict(test.without_expression()).expression
        scores[within] = [np.corrcoef(predicted[:, j], test.targets[:, j])[0, 1] for j in range(2)]
    assert max(scores[False]) < 0 and min(scores[True]) > 0.9
    # the ensemble tries it on its inner folds, held-out patients, for each member that does not pin it
    members = {"ridge": {"method": "ridge"}, "pinned": {"method": "ridge", "within_sample": False}}
    method = create_method("ensemble", members=members, context=[{}, {"within_sample": True}], smoothing=[],
                           candidates=[])
    method.panel = GenePanel(genes=train.genes)
    method.card = method.card.model_copy(update={"training_samples": {f"s{i}": f"P{i}" for i in range(4)}})
    sel = method.fit(train).selection
    assert len(sel["inner_folds"]) == 3 and list(sel["context_inner_pearson"]["pinned"]) == ["{}"]
    assert sel["context"]["ridge"] == {"within_sample": True} and method.fitted["ridge"].config.within_sample
    # every bank a retrieval method builds holds the deviations it learned, whatever genes it returns
    knn = create_method("knn", within_sample=True)
    knn.panel = GenePanel(genes=train.genes)
    knn.fit(train)
    beyond = knn.transcriptome_reference(train, np.hstack([train.targets, 2 * train.targets]),
                                         ["G0", "G1", "H0", "H1"])
    bank_means = [beyond.expression[train.sample_ids == s].mean(0) for s in ("s0", "s3")]
    np.testing.assert_allclose(bank_means[0], bank_means[1], atol=1e-4)
    centred = centred_within_samples(train.targets, train.sample_ids)
    s0 = train.sample_ids == "s0"
    np.testing.assert_allclose(centred[s0].mean(0), train.targets.mean(0), atol=1e-5)
    np.testing.assert_allclose(centred[s0] - centred[s0].mean(0), train.targets[s0] - train.targets[s0].mean(0),
                               atol=1e-5)
    # carhe's expression programmes (NMF) read centred targets, half of them below zero, shifted up to zero
    spots = linear_spots()
    below = centred_within_samples(spots.targets - spots.targets.mean(0), spots.sample_ids)
    loadings = create_method("carhe", programmes=3)._programme_loadings(replace(spots, targets=below))
    assert (below < 0).mean() > 0.4 and np.allclose(loadings.sum(1), 1.0, atol=1e-5)
    assert (np.abs(np.corrcoef(np.hstack([loadings, below]).T)[:3, 3:]).max(1) > 0.8).all()  # each follows genes


def test_ensemble_members_keep_their_configuration_on_too_few_inner_folds():
    """Two inner folds choose nothing (min_selection_folds=3): each member is fitted on them as configured
    only, runs as configured, and the members have an equal say; the old option name still loads."""
    train, _, _ = two_patient_spots()
    train = with_field(train.subset(np.isin(train.sample_ids, ["s1", "s2"])))
    members = {"knn": {"method": "knn", "top_k": 5},
               "bleep": {"method": "bleep", "ensemble": 1, "context_neighbours": 0} | FAST}
    method = create_method("ensemble", members=members)
    method.panel = GenePanel(genes=train.genes)
    method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2"}})
    sel = method.fit(train).selection
    assert len(sel["inner_folds"]) == 2 and sel["combination"] == "equal"
    assert {lb: list(v) for lb, v in sel["context_inner_pearson"].items()} == {
        "knn": ['{"smooth_neighbours": 0}'], "bleep": ['{"query_neighbours": 6, "smooth_neighbours": 0}']
    }  # only the members as configured were fitted
    assert sel["context"] == {"knn": {"smooth_neighbours": 0}, "bleep": {"query_neighbours": 6, "smooth_neighbours": 0}}
    assert method.fitted["knn"].config.context_neighbours == 0 and method.fitted["bleep"].config.query_neighbours == 6
    assert create_method("ensemble", min_stacking_folds=4).config.min_selection_folds == 4


def test_ensemble_refits_each_member_as_it_would_be_fitted_on_its_own():
    """Given validation spots, the refitted members stop early on them, as the same methods fitted on the
    same (train, val) alone: the ensemble's member and the member's own benchmark row are one model."""
    train, test, _ = two_patient_spots()
    train = train.subset(np.isin(train.sample_ids, ["s1", "s2"]))
    rows = np.arange(len(train))
    fit, val = train.subset(rows % 5 != 0), train.subset(rows % 5 == 0)
    bleep = {"ensemble": 1, "context_neighbours": 0} | FAST
    method = create_method("ensemble", members={"bleep": {"method": "bleep"} | bleep})
    method.panel = GenePanel(genes=train.genes)
    method.card = method.card.model_copy(update={"training_samples": {"s1": "P1", "s2": "P2"}})
    method.fit(fit, val)
    alone = create_method("bleep", **bleep)
    alone.panel, alone.card = method.panel, method.card
    alone.fit(fit, val)
    query = test.without_expression()
    np.testing.assert_allclose(method.fitted["bleep"].predict(query).expression, alone.predict(query).expression,
                               rtol=1e-5, atol=1e-6)


def test_ensemble_fits_weights_once_enough_patients_are_held_out():
    """With three or more inner folds, 'auto' fits non-negative stacking weights on the held-out
    predictions, on a common scale per member: the weaker member (1-nearest-neighbour retrieval)
    gets less say than the regression."""
    spots = replace(linear_spots(300), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4", "s5"], dtype=object), 60))
    members = {"ridge": {"method": "ridge_cv", "pca_components": 8}, "knn1": {"method": "knn", "top_k": 1}}
    method = create_method("ensemble", members=members, context=[{}], candidates=[])
    method.panel = GenePanel(genes=spots.genes)
    sel = method.fit(spots).selection
    assert sel["combination"] == "global" and len(sel["inner_folds"]) == 3
    assert np.mean(sel["weights"]["ridge"]) > np.mean(sel["weights"]["knn1"]) >= 0


def test_an_inner_fit_predicts_once_for_every_smoothing_it_is_scored_with(monkeypatch):
    """Smoothing averages a prediction with its neighbours', so the ensemble's inner fits predict a held-out
    fold once per other query option and smooth that prediction for each smoothing tried: the same values as
    predicting anew with each setting."""
    from he2st.methods.models.ensemble import fit_member

    spots = replace(linear_spots(240), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4"], dtype=object), 60))
    test = np.asarray(spots.sample_ids) == "s4"
    knn = create_method("knn", top_k=5)
    knn.panel = GenePanel(genes=spots.genes)
    calls: list[int] = []
    own = type(knn)._predict
    monkeypatch.setattr(type(knn), "_predict", lambda self, s: calls.append(len(s)) or own(self, s))
    queries = [{"smooth_neighbours": 0}, {"smooth_neighbours": 4}, {"smooth_neighbours": 8}]
    run = fit_member(knn, spots, test, np.zeros(int((~test).sum()), bool), queries)
    assert not run.failure and calls == [60]
    for options, pred in zip(queries, run.predictions, strict=True):
        knn.config = knn.config.model_copy(update=options)
        np.testing.assert_array_equal(pred, knn.predict(spots.subset(test)).expression)
    assert not np.allclose(run.predictions[0], run.predictions[2])


def test_a_runner_receives_the_fits_longest_first_and_returns_them_in_order():
    """Tasks reach a pool longest first, so that its workers run out of work together; the results come back
    in the order the tasks were given. Without a runner they run here, in order."""
    from he2st.methods.inner_tasks import inner_tasks, map_fits, runs_in_parallel

    seen: list[int] = []

    def runner(task, arguments):
        seen.extend(a[0] for a in arguments)
        return [task(*a) for a in arguments]

    with inner_tasks(runner):
        assert runs_in_parallel()
        assert map_fits(operator.neg, [(1,), (2,), (3,), (4,)], [1.0, 5.0, 1.0, 3.0]) == [-1, -2, -3, -4]
    assert seen == [2, 4, 1, 3] and not runs_in_parallel()
    assert map_fits(operator.neg, [(1,), (2,)], [1.0, 5.0]) == [-1, -2] and seen == [2, 4, 1, 3]


def test_inner_fits_and_refits_go_to_the_runner_a_workflow_hands_and_give_the_same_model():
    """A workflow's runner (a process pool, Ray) receives every independent fit of a fit: the ensemble's fits
    on all inner folds in one map, longest first, with the refits of the members whose options the selection
    cannot change (here all three: one context variant each), and the inner folds of a reliability estimate
    of a method without stored inner predictions. A member that failed on a fold counts on no later fold, and
    the model is the serial fit's."""
    from he2st.methods.calibration import estimate_reliability
    from he2st.methods.inner_tasks import inner_tasks

    spots = replace(linear_spots(300), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4", "s5"], dtype=object), 60))
    members = {"ridge": {"method": "ridge_cv", "pca_components": 8}, "knn": {"method": "knn", "top_k": 5},
               "carhe": {"method": "carhe", "celltypes_from": "extras"}}
    maps: list[tuple[str, int]] = []

    def runner(task, arguments):
        maps.append((task.__name__, len(arguments)))
        return [pickle.loads(pickle.dumps(task(*pickle.loads(pickle.dumps(a))))) for a in arguments]  # as a pool would

    def fitted(run):
        ensemble = create_method("ensemble", members=members, candidates=[], context=[{}], smoothing=[])
        ensemble.panel = GenePanel(genes=spots.genes)
        ridge = create_method("ridge_cv", pca_components=8)
        ridge.panel = GenePanel(genes=spots.genes)
        with inner_tasks(run):
            selection = ensemble.fit(spots).selection
            ridge.fit(spots)
            return ensemble, selection, estimate_reliability(ridge, spots)

    serial, sel, rel = fitted(None)
    pooled, sel_p, rel_p = fitted(runner)
    assert maps == [("fit_member", 3 * 3 + 3), ("fit_and_predict", 3)]
    assert "carhe" in sel_p["dropped"] and sel_p["inner_pearson"] == sel["inner_pearson"]
    assert sel_p["dropped"] == sel["dropped"] and sel_p["weights"] == sel["weights"]
    query = spots.without_expression()
    np.testing.assert_array_equal(pooled.predict(query).expression, serial.predict(query).expression)
    np.testing.assert_array_equal(rel_p.expected_r, rel.expected_r)
    np.testing.assert_array_equal(rel_p.residuals, rel.residuals)


def test_ensemble_tries_other_methods_within_its_budget_when_the_inner_folds_select(tmp_path):
    """With enough inner folds, methods beside the members (``candidates``) are fitted on the inner folds and
    stacked with them; a candidate with weight is refitted and saved like a member. With too few inner folds
    only the members run. ``registered`` means every method within ``cost_budget`` that no member runs."""
    spots = replace(linear_spots(300), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4", "s5"], dtype=object), 60))
    train, test = spots.subset(np.arange(240)), spots.subset(np.arange(240, 300))
    members = {"ridge": {"method": "ridge_cv", "pca_components": 8}}
    method = create_method("ensemble", members=members, candidates=["knn"], context=[{}], smoothing=[])
    method.panel = GenePanel(genes=spots.genes)
    sel = method.fit(train).selection
    assert sel["candidates"] == ["knn"] and len(sel["inner_pearson"]["knn"]) == 3
    assert sel["combination"] == "global" and set(sel["weights"]) | set(sel["dropped"]) == {"ridge", "knn"}
    pred = method.predict(test.without_expression()).expression
    back = load_method(method.save(tmp_path / "ens.pt"))
    np.testing.assert_allclose(back.predict(test.without_expression()).expression, pred, rtol=1e-5, atol=1e-5)
    two = create_method("ensemble", members=members, candidates=["knn"], context=[{}], smoothing=[])
    two.panel = GenePanel(genes=spots.genes)
    assert two.fit(train.subset(np.isin(train.sample_ids, ["s1", "s2"]))).selection["candidates"] == []
    cheap = create_method("ensemble", cost_budget=5.0)._candidate_labels()
    assert "nh2st" not in cheap and "cmrcnet" not in cheap and "ridge" in cheap and "knn" not in cheap  # knn: a member
    assert "nh2st" in create_method("ensemble")._candidate_labels()
    assert "nh2st_faithful" in create_method("ensemble", cost_budget=None)._candidate_labels()
    with pytest.raises(He2stError, match="itself"):
        create_method("ensemble", candidates=["ensemble"])


def test_a_candidate_given_as_a_spec_runs_with_its_options_where_the_inner_folds_select(tmp_path):
    """A candidate may be a spec (a method and options, as a member's): labelled by both, tried and stacked
    on the inner folds like a named one, saved with its options, and not tried where a member has it."""
    spots = replace(linear_spots(300), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4", "s5"], dtype=object), 60))
    train, test = spots.subset(np.arange(240)), spots.subset(np.arange(240, 300))
    members = {"ridge": {"method": "ridge_cv", "pca_components": 8}}
    spec = {"method": "knn", "top_k": 5}
    method = create_method("ensemble", members=members, candidates=["knn", spec], context=[{}], smoothing=[])
    assert method._candidate_labels() == ["knn", "knn(top_k=5)"]
    assert method._create("knn(top_k=5)").config.top_k == 5 and method._create("knn").config.top_k != 5
    method.panel = GenePanel(genes=spots.genes)
    sel = method.fit(train).selection
    assert sel["candidates"] == ["knn", "knn(top_k=5)"] and len(sel["inner_pearson"]["knn(top_k=5)"]) == 3
    assert set(sel["weights"]) | set(sel["dropped"]) == {"ridge", "knn", "knn(top_k=5)"}
    pred = method.predict(test.without_expression()).expression
    back = load_method(method.save(tmp_path / "ens.pt"))
    np.testing.assert_allclose(back.predict(test.without_expression()).expression, pred, rtol=1e-5, atol=1e-5)
    two = create_method("ensemble", members=members, candidates=[spec], context=[{}], smoothing=[])
    two.panel = GenePanel(genes=spots.genes)
    assert two.fit(train.subset(np.isin(train.sample_ids, ["s1", "s2"]))).selection["candidates"] == []
    assert create_method("ensemble", members={"k": spec}, candidates=[spec, "knn"])._candidate_labels() == []
    named = create_method("ensemble", members=members, candidates=[spec | {"label": "knn5"}])
    assert named._candidate_labels() == ["knn5"] and named._create("knn5").config.top_k == 5
    with pytest.raises(He2stError, match="names no method"):
        create_method("ensemble", candidates=[{"top_k": 5}])


def test_a_group_of_options_given_in_part_keeps_the_methods_own_defaults():
    """``train: {epochs: 40}`` changes the epochs only: the rest of the group stays the method's own (bleep's
    lr 3e-4, nh2st's batch 64), not the generic TrainConfig defaults; on a given config, the rest stays that
    config's. A full group replaces the group."""
    from he2st.methods.configs.common import TrainConfig
    from he2st.methods.models.bleep import BLEEP

    bleep = create_method("bleep", train={"epochs": 40})
    assert bleep.config.train == create_method("bleep").config.train.model_copy(update={"epochs": 40})
    assert create_method("nh2st", train={"precision": "bf16"}).config.train.batch_size == 64
    tuned = BLEEP(bleep.config, train={"lr": 5e-4}).config.train
    assert (tuned.epochs, tuned.lr, tuned.batch_size) == (40, 5e-4, 128)
    assert create_method("bleep", train=TrainConfig(epochs=3)).config.train == TrainConfig(epochs=3)
    ensemble = create_method("ensemble", members={"b": {"method": "bleep", "train": {"epochs": 2}}})
    assert ensemble._create("b").config.train.lr == 3e-4


@pytest.mark.parametrize("scale_within", ["inner", "sample"])
def test_a_member_whose_refit_fails_leaves_the_combination_of_the_others(monkeypatch, scale_within):
    """A member with weight on the inner folds whose refit fails is dropped; the others' combination is then
    the one their held-out predictions give alone, not theirs with the dropped member's share (its level in
    the intercepts, its part of the spread) cut out."""
    from he2st.methods.models import ensemble

    spots = replace(linear_spots(300), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4", "s5"], dtype=object), 60))
    train, query = spots.subset(np.arange(240)), spots.subset(np.arange(240, 300)).without_expression()
    ridge = {"ridge": {"method": "ridge_cv", "pca_components": 8}}
    options = {"context": [{}], "smoothing": [], "candidates": [], "scale_within": scale_within}
    own = ensemble.fit_member

    def knn_refit_fails(method, spots, test, val, queries):
        if test is None and method.name == "knn":
            return ensemble.MemberFit(failure="knn: cannot refit")
        return own(method, spots, test, val, queries)

    monkeypatch.setattr(ensemble, "fit_member", knn_refit_fails)
    both = create_method("ensemble", members=ridge | {"knn": {"method": "knn", "top_k": 5}}, **options)
    both.panel = GenePanel(genes=spots.genes)
    assert "cannot refit" in both.fit(train).selection["dropped"]["knn"] and list(both.fitted) == ["ridge"]
    alone = create_method("ensemble", members=ridge, **options)
    alone.panel = GenePanel(genes=spots.genes)
    alone.fit(train)
    np.testing.assert_allclose(both.predict(query).expression, alone.predict(query).expression, rtol=1e-5, atol=1e-5)


def test_an_ensemble_whose_members_all_fail_on_the_inner_folds_says_why():
    spots = replace(linear_spots(300), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4", "s5"], dtype=object), 60))
    method = create_method("ensemble", members={"carhe": {"method": "carhe", "celltypes_from": "extras"}},
                           candidates=[], context=[{}], smoothing=[])
    method.panel = GenePanel(genes=spots.genes)
    with pytest.raises(He2stError, match="no member could be fitted.*proportions"):
        method.fit(spots)


def test_a_candidate_whose_label_is_a_members_running_another_method_is_still_tried():
    """A member labelled ``ridge`` that runs ``ridge_cv`` does not run ``ridge``: the candidate ``ridge`` (named,
    registered, or a spec labelled so) is tried under a label of its own, and runs as itself."""
    members = {"ridge": {"method": "ridge_cv", "pca_components": 8}}
    named = create_method("ensemble", members=members, candidates=["ridge", "ridge_cv"])
    assert named._candidate_labels() == ["ridge (candidate)"]  # ridge_cv: a member runs it
    assert named._create("ridge (candidate)").name == "ridge" and named._create("ridge").name == "ridge_cv"
    assert "ridge (candidate)" in create_method("ensemble", members=members)._candidate_labels()
    spec = create_method("ensemble", members=members, candidates=[{"method": "knn", "top_k": 5, "label": "ridge"}])
    assert spec._candidate_labels() == ["ridge (candidate)"] and spec._create("ridge (candidate)").config.top_k == 5
    spots = replace(linear_spots(300), sample_ids=np.repeat(np.array(["s1", "s2", "s3", "s4", "s5"], dtype=object), 60))
    named = create_method("ensemble", members=members, candidates=["ridge"], context=[{}], smoothing=[])
    named.panel = GenePanel(genes=spots.genes)
    sel = named.fit(spots).selection
    assert sel["candidates"] == ["ridge (candidate)"] and len(sel["inner_pearson"]["ridge (candidate)"]) == 3


def test_validation_score_is_taken_within_each_validation_sample():
    """Early stopping scores what the benchmark scores: each gene's pattern within a validation sample, averaged
    over the samples. A prediction that only tells two sections' levels apart correlates well when the sections
    are pooled, yet predicts no spot within either of them."""
    method, _ = fitted("mlp")
    spots = linear_spots(n=200, n_samples=2)
    rng = np.random.default_rng(0)
    level = np.where(spots.sample_ids == "s1", 0.0, 5.0)[:, None]
    val = replace(spots, targets=(level + rng.normal(size=spots.targets.shape)).astype(np.float32))
    # the sections' levels, and noise within each
    method.validation_prediction = lambda spots, rows: (level + rng.normal(size=val.targets.shape)).astype(np.float32)
    assert abs(method.validation_pearson(spots, val)) < 0.1


def test_validation_without_two_spots_of_one_sample_does_not_steer_training():
    """A within-sample Pearson needs two spots of a sample: validation sets without them are no validation
    (the fit keeps its last epoch), not a score of -1 every epoch that keeps the first."""
    from he2st.methods.neural import has_validation

    spots = linear_spots(n=60, n_samples=3)
    one_each = spots.subset(np.array([np.flatnonzero(spots.sample_ids == s)[0] for s in ("s1", "s2", "s3")]))
    assert len(set(one_each.sample_ids)) == 3 and not has_validation(one_each)
    assert has_validation(spots.subset(np.flatnonzero(spots.sample_ids == spots.sample_ids[0])[:2]))
    assert not has_validation(None) and not has_validation(spots.subset(np.array([0])))


@pytest.mark.parametrize("name, options", [
    ("nh2st", {"dim": 16, "fusion_heads": 2, "head_hidden": 16, "neighbour_k": 4}),
    ("bleep_faithful", {"top_k": 5, "query_neighbours": 4}),
])
def test_validation_spots_cut_from_training_sections_read_their_sections_neighbours(name, options):
    """Validation spots drawn at random from training sections (too few samples to hold out whole ones) are
    scored as a prediction of their whole section scores them: a method reading physical neighbours finds
    them among all the section's spots, not among the other validation spots scattered over it."""
    from he2st.stats import mean_sample_pearson

    spots = linear_spots(n=200, n_samples=2)
    held = np.random.default_rng(0).random(len(spots)) < 0.2
    method = create_method(name, **options, train={"epochs": 2, "batch_size": 32})
    method.panel = GenePanel(genes=spots.genes)
    method.fit(spots.subset(~held), spots.subset(held))
    train, val = spots.subset(~held), spots.subset(held)
    method.prepare_validation(train)
    whole = method._predict(spots.without_expression()).expression[held]
    expected = mean_sample_pearson(whole, val.targets, val.sample_ids)
    assert method.validation_pearson(train, val) == pytest.approx(expected, abs=1e-5)
