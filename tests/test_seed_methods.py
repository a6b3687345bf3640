"""CMRCNet, NH2ST and CarHE: their shared blocks (masking, physical neighbourhoods, attention over
neighbours) and the methods themselves on small synthetic spot sets (fit, image-only prediction,
checkpoint round trip, ablation switches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.data.genes import GenePanel
from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods import list_methods, load_method, method_class
from he2st.methods.models.carhe import CarHE
from he2st.methods.models.cmrc import CMRCNet
from he2st.methods.layers.features import FeatureScaler
from he2st.methods.layers.losses import multi_positive_nce
from he2st.methods.layers.masking import apply_mask, feature_chunks, random_mask
from he2st.methods.layers.neighbourhood import (
    NeighbourhoodAttention,
    NeighbourhoodHypergraph,
    knn_hypergraph,
    spatial_neighbours,
)
from he2st.methods.models.nh2st import NH2ST
from he2st.methods.layers.nn import BidirectionalFusion, ExpressionTokenizer

SEED_METHODS = {cls.name: cls for cls in (CMRCNet, NH2ST, CarHE)}
EPOCHS = {"epochs": 6, "batch_size": 48, "patience": 3}
SMALL = {
    "cmrcnet": {
        "projection_dim": 32,
        "mlp_hidden": [32],
        "attention_dim": 32,
        "expression_token_hidden": 64,
        "cross_heads": 2,
        "fusion_heads": 4,
        "fusion_depth": 1,
        "top_k": 10,
        "train": EPOCHS,
    },
    "nh2st": {"dim": 32, "fusion_heads": 4, "head_hidden": 32, "neighbour_k": 4, "train": EPOCHS | {"lr": 3e-3}},
    "carhe": {
        "projection_dim": 32,
        "mlp_hidden": [32],
        "proportion_hidden": [16],
        "proportion_head_hidden": 32,
        "histology_pretrain_epochs": 1,
        "histology_neighbours": 4,
        "top_k": 10,
        "train": EPOCHS,
    },
}
N_TYPES = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_spots(
    n_per_sample: int = 80, d: int = 24, g: int = 12, seed: int = 0, tokens: bool = False
) -> SpotSet:
    """Three samples on identical 100 µm grids (so only the sample id separates them); a smooth spatial
    latent drives image features, expression and cell-type proportions."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_per_sample)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_per_sample] * 100.0
    coords = np.concatenate([grid] * 3)
    n = len(coords)
    waves = rng.normal(size=(3, 2)) / 400.0
    latent = np.sin(
        coords @ waves.T
        + rng.uniform(0, 6, size=(1, 3))
        + np.repeat(rng.normal(size=(3, 3)), n_per_sample, 0)
    )
    latent += 0.3 * rng.normal(size=(n, 3))
    features = latent @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))
    targets = np.log1p(np.exp(latent @ rng.normal(size=(3, g)) * 0.7 + 1.0))
    logits = latent @ rng.normal(size=(3, N_TYPES)) * 1.5
    props = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    spots = SpotSet(
        sample_ids=np.repeat(np.array(["s1", "s2", "s3"], dtype=object), n_per_sample),
        barcodes=np.arange(n).astype(str).astype(object),
        features=features.astype(np.float32),
        coords_um=coords,
        genes=[f"G{i}" for i in range(g)],
        targets=targets.astype(np.float32),
        extras={"celltype_major": props.astype(np.float32)},
    )
    if tokens:
        spots.tokens = (features[:, None, :8] * rng.normal(1, 0.1, size=(1, 4, 8))).astype(np.float32)
    return spots


def split(spots: SpotSet) -> tuple[SpotSet, SpotSet, SpotSet]:
    """Train = s1 + most of s2, val = rest of s2, test = the whole of s3 (a new 'slide')."""
    sid = spots.sample_ids
    idx2 = np.flatnonzero(sid == "s2")
    train = np.concatenate([np.flatnonzero(sid == "s1"), idx2[:60]])
    return spots.subset(train), spots.subset(idx2[60:]), spots.subset(np.flatnonzero(sid == "s3"))


def fit_method(name: str, tokens: bool = False, **options):
    spots = synthetic_spots(tokens=tokens)
    train, val, test = split(spots)
    method = SEED_METHODS[name](**(SMALL[name] | options))
    method.panel = GenePanel(genes=spots.genes)
    log = method.fit(train, val)
    return method, log, train, test


def mean_pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.nanmean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])]))


# ============================================================================ masking
@pytest.mark.parametrize("mode", ["element", "token"])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75])
def test_mask_ratio_is_honoured_exactly(mode, ratio):
    b, t, c = 16, 6, 10
    mask = random_mask((b, t, c), ratio, mode, torch.Generator().manual_seed(0))
    assert mask.shape == (b, t, c) and mask.dtype == torch.bool
    n = t * c if mode == "element" else t
    per_sample = mask.reshape(b, -1).sum(1) if mode == "element" else mask[:, :, 0].sum(1)
    assert (per_sample == round(ratio * n)).all()
    if mode == "token":  # whole tokens
        assert (mask.all(dim=2) | ~mask.any(dim=2)).all()
    if 0 < ratio:
        assert len({tuple(m.flatten().tolist()) for m in mask}) > 1  # positions differ between spots
    x = torch.randn(b, t, c)
    masked = apply_mask(x, mask)
    assert (masked[mask] == 0).all() and torch.equal(masked[~mask], x[~mask])
    token = torch.full((c,), 7.0)
    assert (apply_mask(x, mask, token)[mask] == 7.0).all()


def test_mask_ratio_out_of_range_is_refused():
    with pytest.raises(He2stError):
        random_mask((2, 3, 4), 1.0)


def test_cmrcnet_uses_its_configured_mask_ratio():
    for ratio, mode in [(0.5, "element"), (0.3, "token")]:
        method = CMRCNet(mask_ratio=ratio, mask_mode=mode, attention_dim=16, cross_heads=2, fusion_heads=2)
        method.dims = {"image_dim": 24, "n_genes": 12, "token_dim": 8, "n_tokens": 10}
        method.build(method.dims)
        mask = method.mask(8, torch.Generator().manual_seed(1))
        assert mask.shape == (8, 10, 16)
        if mode == "element":
            assert (mask.reshape(8, -1).sum(1) == round(ratio * 160)).all()
        else:
            assert (mask[:, :, 0].sum(1) == round(ratio * 10)).all()


def test_feature_chunks_split_the_vector_into_tokens():
    x = np.arange(2 * 10, dtype=np.float32).reshape(2, 10)
    tokens = feature_chunks(x, 4)
    assert tokens.shape == (2, 4, 3)
    np.testing.assert_array_equal(tokens.reshape(2, -1)[:, :10], x)
    assert (tokens.reshape(2, -1)[:, 10:] == 0).all()
    assert feature_chunks(torch.from_numpy(x), 4).shape == (2, 4, 3)


# ============================================================================ neighbourhoods
def test_neighbours_come_from_physical_distance_within_the_same_sample():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1000, size=(60, 2))
    coords = np.concatenate([coords, coords + 0.5])  # a second sample almost on top of the first
    sids = np.array(["a"] * 60 + ["b"] * 60, dtype=object)
    index, valid = spatial_neighbours(coords, sids, k=5)
    assert index.shape == valid.shape == (120, 5) and valid.all()
    assert (sids[index] == sids[:, None]).all(), "a neighbour crossed samples"
    assert (index != np.arange(120)[:, None]).all(), "a spot is its own neighbour"
    for i in range(120):  # brute force: the 5 nearest other spots of the same sample, nearest first
        same = np.flatnonzero((sids == sids[i]) & (np.arange(120) != i))
        dist = np.linalg.norm(coords[same] - coords[i], axis=1)
        np.testing.assert_array_equal(index[i], same[np.argsort(dist, kind="stable")[:5]])
    d = np.linalg.norm(coords[index] - coords[:, None], axis=2)
    assert (np.diff(d, axis=1) >= 0).all()


def test_neighbour_padding_for_small_samples_and_distance_limit():
    coords = np.array([[0, 0], [100, 0], [200, 0], [5000, 0], [0, 0]], dtype=float)
    sids = np.array(["a", "a", "a", "a", "b"], dtype=object)
    index, valid = spatial_neighbours(coords, sids, k=4, max_distance_um=150)
    assert valid[4].sum() == 0 and (index[4] == 4).all()  # alone in its sample: nothing valid, self-padded
    assert valid[0].tolist() == [True, False, False, False] and index[0, 0] == 1
    assert valid[1].sum() == 2 and valid[3].sum() == 0
    assert (index[~valid] == np.nonzero(~valid)[0]).all()
    # duplicate coordinates: the twin is a neighbour, the spot itself is not
    index, valid = spatial_neighbours(np.zeros((3, 2)), np.array(["a"] * 3), k=2)
    assert valid.all() and (index != np.arange(3)[:, None]).all()


def test_equidistant_neighbours_depend_on_the_spots_alone():
    """On a lattice many spots are equidistant: which of them are a spot's k nearest is decided by their
    coordinates (x, then y), not by the order of the rows or by which other spots are in the set, so that a
    slide predicted in chunks reads the neighbours it reads whole. On a square grid of 8 um bins, k = 6 takes
    the 4 sides and 2 of the 4 diagonals. A tie wider than the k-d tree's window (the centre of a ring of 20
    spots, equidistant up to float rounding) is resolved the same way."""
    side = np.arange(12) * 8.0
    coords = np.stack(np.meshgrid(side, side), -1).reshape(-1, 2)
    sids = np.array(["a"] * len(coords), dtype=object)
    perm = np.random.default_rng(0).permutation(len(coords))
    chunk = np.flatnonzero((coords < 64).all(1))
    inside = ((coords[chunk] >= 16) & (coords[chunk] < 48)).all(1)  # every candidate of these is in the chunk
    for k in (1, 2, 6, 8):
        index, valid = spatial_neighbours(coords, sids, k)
        shuffled, _ = spatial_neighbours(coords[perm], sids[perm], k)
        np.testing.assert_array_equal(perm[shuffled], index[perm])
        part, _ = spatial_neighbours(coords[chunk], sids[chunk], k)
        np.testing.assert_array_equal(chunk[part[inside]], index[chunk[inside]])
        d = np.linalg.norm(coords[index] - coords[:, None], axis=2)
        assert valid.all() and (np.diff(d, axis=1) >= 0).all()
    centre = np.flatnonzero((coords == [40.0, 40.0]).all(1))[0]
    index, _ = spatial_neighbours(coords, sids, 6)
    assert coords[index[centre]].tolist() == [[32, 40], [40, 32], [40, 48], [48, 40], [32, 32], [32, 48]]
    assert coords[spatial_neighbours(coords, sids, 1)[0][centre]].tolist() == [[32, 40]]
    angles = np.arange(20) * np.pi / 10 + 0.3
    ring = np.concatenate([[[0.0, 0.0]], 10 * np.stack([np.cos(angles), np.sin(angles)], 1)])
    ring_ids = np.array(["r"] * 21, dtype=object)
    nearest = spatial_neighbours(ring, ring_ids, 3)[0][0]
    np.testing.assert_array_equal(nearest, 1 + np.lexsort((ring[1:, 1], ring[1:, 0]))[:3])
    order = np.r_[0, 1 + np.random.default_rng(1).permutation(20)]
    np.testing.assert_array_equal(order[spatial_neighbours(ring[order], ring_ids, 3)[0][0]], nearest)


def test_nh2st_neighbourhoods_never_cross_samples_at_prediction():
    method, _, train, test = fit_method("nh2st")
    other = train.without_expression()
    alone = method.predict(test)
    together = method.predict(SpotSet.concat([other, test.without_expression()]))
    np.testing.assert_allclose(together.expression[len(other) :], alone.expression, rtol=1e-5, atol=1e-6)
    nodes, valid = method.neighbourhoods(test, method.context_k)
    assert nodes.shape == (len(test), 1 + method.config.neighbour_k) and valid[:, 0].all()


# ============================================================================ attention blocks
def _padded_batch(b: int = 4, n: int = 6, d: int = 16):
    x = torch.randn(b, n, d)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, 3:] = False
    valid[1, 1:] = False  # only the spot itself
    return x, valid


@pytest.mark.parametrize(
    "layer",
    [
        NeighbourhoodAttention(16, heads=4, depth=2, dropout=0.0),
        NeighbourhoodHypergraph(16, depth=2, hyperedge_k=3, dropout=0.0),
    ],
)
def test_neighbourhood_layers_shapes_and_padding(layer):
    layer.eval()
    x, valid = _padded_batch()
    out = layer(x, valid)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out[~valid] == 0).all()
    x2 = x.clone()
    x2[~valid] = 100.0  # padded nodes must not influence real ones
    torch.testing.assert_close(layer(x2, valid)[valid], out[valid])


def test_knn_hypergraph_incidence():
    x, valid = _padded_batch()
    h = knn_hypergraph(x, valid, k=3)  # (B, nodes, edges)
    assert h.shape == (4, 6, 6)
    for b in range(4):
        for e in range(6):
            members = torch.nonzero(h[b, :, e]).flatten().tolist()
            if not valid[b, e]:
                assert members == []
                continue
            assert e in members and len(members) == min(3, int(valid[b].sum()))
            assert all(valid[b, m] for m in members)


def test_fusion_with_padding_and_token_shapes():
    fusion = BidirectionalFusion(16, heads=4, depth=1).eval()
    a, valid = _padded_batch()
    b = torch.randn(4, 6, 16)
    fa, fb = fusion(a, b, valid, valid)
    assert fa.shape == a.shape and fb.shape == b.shape
    b2 = b.clone()
    b2[~valid] = 50.0
    torch.testing.assert_close(fusion(a, b2, valid, valid)[0], fa)
    tok = ExpressionTokenizer(12, n_tokens=8, dim=16, hidden=32)
    assert tok(torch.randn(5, 12)).shape == (5, 8, 16)
    method = CMRCNet(attention_dim=16, cross_heads=2, fusion_heads=4, projection_dim=24)
    method.dims = {"image_dim": 24, "n_genes": 12, "token_dim": 8, "n_tokens": 10}
    method.build(method.dims)
    out = method.net.reconstructor(torch.randn(5, 10, 8), torch.randn(5, 12), method.mask(5))
    assert out.shape == (5, 24)


def test_multi_positive_nce_prefers_the_positives():
    a = torch.randn(6, 8)
    positives = torch.zeros(6, 12, dtype=torch.bool)
    positives[torch.arange(6), torch.arange(6)] = True
    good = multi_positive_nce(a, torch.cat([a, torch.randn(6, 8)]), positives)
    bad = multi_positive_nce(a, torch.cat([torch.randn(6, 8), a]), positives)
    assert good < bad


def test_feature_scaler_projects_on_principal_axes_and_round_trips():
    """With components, the z-scores land on the training spots' top principal axes: uncorrelated,
    ordered by variance, unit mean variance; the state restores the same map."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 20)) + 0.1 * rng.normal(size=(400, 20)) + 5.0
    scaler = FeatureScaler().fit(x, components=3)
    z = scaler(x)
    assert z.shape == (400, 3) and scaler.dim == 3
    cov = np.cov(z.T)
    np.testing.assert_allclose(np.diag(cov).mean(), 1.0, rtol=0.01)
    assert np.all(np.diff(np.diag(cov)) < 0) and np.abs(cov - np.diag(np.diag(cov))).max() < 1e-3
    back = FeatureScaler.from_state(scaler.state("s"), "s")
    np.testing.assert_array_equal(back(x), z)
    assert FeatureScaler().fit(x, components=50).dim == 20  # more components than features: z-scores only


# ============================================================================ methods
CASES = [
    ("cmrcnet", False, {}),
    ("cmrcnet", True, {"mask_mode": "token"}),
    ("nh2st", False, {}),
    ("nh2st", False, {"neighbour_layer": "attention", "neighbour_heads": 4}),
    ("nh2st", False, {"input_components": 6, "neighbour_fusion": "nodes"}),
    ("carhe", False, {}),
]


@pytest.mark.parametrize(("name", "tokens", "options"), CASES)
def test_fit_learns_and_predicts_from_images_only(name, tokens, options, tmp_path):
    method, log, _, test = fit_method(name, tokens=tokens, **options)
    assert log.curves["train_loss"] and np.isfinite(log.curves["train_loss"]).all()
    pred = method.predict(test.without_expression())
    # the spots' expression (and expression-derived extras) cannot change the prediction
    direct = method._predict(test)
    np.testing.assert_array_equal(direct.expression, pred.expression)
    assert mean_pearson(pred.expression, test.targets) > 0.3, f"{name} learned nothing"
    if name != "nh2st":
        assert set(pred.uncertainty) == {"best_similarity", "dispersion"}
    if options or tokens:  # a variant's own modules must survive a checkpoint (the defaults: conformance tests)
        again = load_method(method.save(tmp_path / f"{name}.pt")).predict(test.without_expression())
        np.testing.assert_array_equal(again.expression, pred.expression)
        for key in pred.extras:
            np.testing.assert_array_equal(again.extras[key], pred.extras[key])


def test_carhe_proportion_head_beats_the_training_mean():
    method, _, train, test = fit_method("carhe", train=EPOCHS | {"epochs": 15, "patience": 15})
    truth = test.extras["celltype_major"]
    pred = method.predict(test).extras["celltype_major"]
    assert pred.shape == truth.shape
    np.testing.assert_allclose(pred.sum(1), 1.0, rtol=1e-5)
    mse_model = np.mean((pred - truth) ** 2)
    mse_mean = np.mean((train.extras["celltype_major"].mean(0) - truth) ** 2)
    assert mse_model < 0.7 * mse_mean, (mse_model, mse_mean)


def test_carhe_validation_scores_the_proportions_within_each_sample(monkeypatch):
    """The proportions' share of CarHE's validation score is taken within each validation sample, as the
    expression's is: predicted proportions that only tell two sections' compositions apart add nothing."""
    from he2st.methods.neural import NeuralMethod

    method, _, train, _ = fit_method("carhe", train=EPOCHS | {"epochs": 1})
    spots = synthetic_spots()
    val = spots.subset(np.flatnonzero(np.isin(spots.sample_ids, ["s2", "s3"])))
    truth = val.extras["celltype_major"]
    rng = np.random.default_rng(0)
    # each section's mean composition, and noise within it
    level = np.stack([truth[val.sample_ids == s].mean(0) for s in val.sample_ids])
    monkeypatch.setattr(NeuralMethod, "validation_score", lambda self, train, spots: 0.5)
    monkeypatch.setattr(method, "predict_proportions", lambda spots: level + 0.01 * rng.normal(size=level.shape))
    assert method.validation_pearson(train, val) == pytest.approx(0.25, abs=0.1)


def test_carhe_validation_of_non_finite_proportions_is_the_worst_score(monkeypatch):
    """A diverged proportion head scores the epoch as the worst (never kept), as non-finite expression does,
    rather than ending the fit."""
    method, _, train, _ = fit_method("carhe", train=EPOCHS | {"epochs": 1})
    val = synthetic_spots().subset(np.arange(160, 240))
    assert method.validation_pearson(train, val) > -1.0
    monkeypatch.setattr(method, "predict_proportions", lambda spots: np.full((len(spots), N_TYPES), np.nan))
    assert method.validation_pearson(train, val) == -1.0


def test_carhe_without_proportions_learns_expression_programmes(tmp_path):
    """Data without cell-type proportions (most data): the third modality is NMF expression programmes of
    the training spots, predicted from the image as extras["expression_programmes"]; asking for the
    proportions explicitly is one clear error; switching the modality off still works."""
    spots = synthetic_spots()
    train, _, test = split(spots)
    train.extras = {}
    with pytest.raises(He2stError, match="celltypes_from=programmes"):
        CarHE(**SMALL["carhe"] | {"celltypes_from": "extras"}).fit(train)
    method = CarHE(**SMALL["carhe"] | {"programmes": 4, "train": EPOCHS | {"epochs": 2}})
    method.panel = GenePanel(genes=spots.genes)
    method.fit(train)
    pred = method.predict(test).extras
    assert list(pred) == ["expression_programmes"] and pred["expression_programmes"].shape == (len(test), 4)
    np.testing.assert_allclose(pred["expression_programmes"].sum(1), 1.0, rtol=1e-5)
    loaded = load_method(method.save(tmp_path / "carhe.pt"))
    np.testing.assert_allclose(loaded.predict(test).extras["expression_programmes"], pred["expression_programmes"],
                               rtol=1e-5, atol=1e-6)
    off = CarHE(**SMALL["carhe"] | {"celltype_transfer": False, "train": EPOCHS | {"epochs": 1}})
    off.panel = GenePanel(genes=spots.genes)
    off.fit(train)
    assert off.predict(test).extras == {} and "proportion_tower" not in dict(off.net.named_children())


def test_carhe_unlabelled_spots_and_full_transcriptome_bank():
    spots = synthetic_spots()
    train, val, test = split(spots)
    unlabelled = synthetic_spots(seed=5).subset(np.arange(40)).without_expression()
    unlabelled.targets = None
    method = CarHE(**SMALL["carhe"] | {"train": EPOCHS | {"epochs": 2}})
    method.panel = GenePanel(genes=spots.genes)
    log = method.fit(train, val, unlabelled=unlabelled)
    assert len(log.curves["pretrain_loss"]) == 1
    rng = np.random.default_rng(1)
    full = np.hstack([train.targets, rng.random((len(train), 300), dtype=np.float32)])
    genes = train.genes + [f"EXTRA{i}" for i in range(300)]
    method.bank = method.reference_bank(
        train.targets, train.genes, list(train.sample_ids), output_expression=full, output_genes=genes
    )
    pred = method.predict(test)
    assert pred.expression.shape == (len(test), 312) and pred.genes[-1] == "EXTRA299"


@pytest.mark.parametrize(
    ("name", "options", "absent"),
    [
        ("cmrcnet", {"reconstruction": False}, "reconstructor"),
        ("nh2st", {"neighbours": False}, "expression_neighbourhood"),
        ("nh2st", {"fusion": False}, "target_fusion"),
        ("nh2st", {"contrastive": False}, "target_fusion"),
        ("carhe", {"histology_transfer": False}, "histology_projector"),
    ],
)
def test_ablation_switches_remove_their_component(name, options, absent, tmp_path):
    method, _, _, test = fit_method(name, **options | {"train": EPOCHS | {"epochs": 2}})
    modules = dict(method.net.named_children())
    assert absent not in modules or modules[absent] is None
    pred = method.predict(test)
    assert np.isfinite(pred.expression).all()
    back = load_method(method.save(tmp_path / "m.pt"))
    np.testing.assert_array_equal(back.predict(test).expression, pred.expression)


def test_nh2st_neighbour_branch_and_head_inputs_are_separate_switches():
    """`nh2st-no_neighbours` drops the neighbour branch only: the head still reads the neighbours' images;
    `head_neighbour_context=False` changes only what the head reads."""
    dim = SMALL["nh2st"]["dim"]
    no_branch, _, _, test = fit_method("nh2st", neighbours=False, train=EPOCHS | {"epochs": 1})
    modules = dict(no_branch.net.named_children())
    assert "expression_neighbourhood" not in modules and "neighbour_fusion" not in modules
    assert "image_neighbourhood" in modules and no_branch.net.head[0].in_features == 2 * dim
    assert no_branch.context_k == no_branch.config.neighbour_k
    spot_head, _, _, _ = fit_method("nh2st", head_neighbour_context=False, train=EPOCHS | {"epochs": 1})
    modules = dict(spot_head.net.named_children())
    assert {"image_neighbourhood", "expression_neighbourhood", "neighbour_fusion"} <= set(modules)
    assert spot_head.net.head[0].in_features == dim and spot_head.context_k == 0
    # a head on the spot alone predicts a spot the same whichever spots come with it
    alone = spot_head.predict(test.subset(np.arange(5))).expression
    np.testing.assert_allclose(spot_head.predict(test).expression[:5], alone, rtol=1e-5, atol=1e-6)
    with_context = no_branch.predict(test).expression[:5]
    assert not np.allclose(no_branch.predict(test.subset(np.arange(5))).expression, with_context)


def test_cmrcnet_without_reconstruction_optimises_the_contrastive_loss_only():
    method, _, _, _ = fit_method("cmrcnet", reconstruction=False, train=EPOCHS | {"epochs": 2})
    assert method.net.reconstructor is None
    with_rec, _, _, _ = fit_method("cmrcnet", train=EPOCHS | {"epochs": 2})
    assert with_rec.net.reconstructor is not None
    assert sum(p.numel() for p in with_rec.net.parameters()) > sum(p.numel() for p in method.net.parameters())


def test_every_option_is_documented():
    for cls in map(method_class, list_methods()):
        undocumented = [k for k, f in cls.Config.model_fields.items() if not f.description]
        assert not undocumented, f"{cls.name}: {undocumented}"
