"""The faithful presets (`bleep_faithful`, `cmrcnet_faithful`, `nh2st_faithful`): their losses on a fixed
small batch against hand computations of the published formulas, the published schedules, fit /
predict / checkpoint round trips, CMRCNet's end-to-end path, and whether CMRCNet's reconstruction
really reads the masked image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_seed_methods import EPOCHS, SMALL, mean_pearson, split, synthetic_spots
from torch import nn

from he2st.data.genes import GenePanel
from he2st.errors import He2stError
from he2st.methods import create_method, load_method
from he2st.methods.layers.masking import random_mask
from he2st.methods.layers.neighbourhood import knn_hypergraph
from he2st.methods.training import TrainConfig, fit_minibatches, learning_rate

# small widths and few epochs; the training options keep the presets' schedules (a `train` option
# replaces the preset's whole TrainConfig)
TINY = {
    "cmrcnet_faithful": {"projection_dim": 32, "attention_dim": 32, "cross_heads": 2, "fusion_heads": 4,
                         "top_k": 10, "train": EPOCHS | {"lr": 1e-3, "schedule": "cosine", "min_lr": 1e-4,
                                                         "grad_clip": None}},
    "nh2st_faithful": {"dim": 32, "fusion_heads": 4, "head_hidden": 32, "neighbour_k": 4,
                       "train": EPOCHS | {"epochs": 3, "batch_size": 8, "weight_decay": 0.0,
                                         "grad_clip": None, "schedule": "step", "step_epochs": 2}},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ============================================================================ hand computations
def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def hand_bleep_rows(img: list[list[float]], spot: list[list[float]], tau: float = 1.0) -> list[float]:
    """BLEEP's soft-target loss of each spot (the mean of its two directions), with plain loops:
    ``logits = spot img^T / τ``, ``targets = softmax((img img^T + spot spot^T) / 2 / τ)``."""
    n = len(img)
    logits = [[_dot(spot[i], img[j]) / tau for j in range(n)] for i in range(n)]
    sim = [[(_dot(img[i], img[j]) + _dot(spot[i], spot[j])) / 2 / tau for j in range(n)] for i in range(n)]
    targets = [[math.exp(s) / sum(math.exp(t) for t in row) for s in row] for row in sim]
    rows = []
    for i in range(n):
        row_lse = math.log(sum(math.exp(logits[i][j]) for j in range(n)))
        spots_loss = -sum(targets[i][j] * (logits[i][j] - row_lse) for j in range(n))
        col_lse = math.log(sum(math.exp(logits[j][i]) for j in range(n)))
        images_loss = -sum(targets[j][i] * (logits[j][i] - col_lse) for j in range(n))
        rows.append((spots_loss + images_loss) / 2)
    return rows


def hand_nh2st_infonce(
    a: list[list[float]], b: list[list[float]], tau: float = 0.05, weight: float = 0.1
) -> float:
    """NH2ST's ``contrastive_loss``: cosine similarities / τ, off-diagonal ones times ``weight``, and the
    cross-entropy of each row of ``a`` against the rows of ``b`` (one direction only)."""
    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(_dot(v, v))
        return [x / norm for x in v]

    a, b = [unit(v) for v in a], [unit(v) for v in b]
    total = 0.0
    for i in range(len(a)):
        logits = [_dot(a[i], b[j]) / tau * (1.0 if i == j else weight) for j in range(len(b))]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[i]
    return total / len(a)


def hand_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    pairs = zip(x.flatten().tolist(), y.flatten().tolist(), strict=True)
    return sum((p - q) ** 2 for p, q in pairs) / x.numel()


# ============================================================================ losses on a fixed batch
def test_bleep_faithful_loss_is_the_soft_target_loss_at_temperature_one():
    method = create_method("bleep_faithful", projection_dim=8)
    method.build({"image_dim": 6, "n_genes": 5})
    gen = torch.Generator().manual_seed(0)
    img, spot = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    got = method._loss(0, img, spot).item()
    assert got == pytest.approx(sum(hand_bleep_rows(img.tolist(), spot.tolist())) / 5, rel=1e-5)


def test_cmrcnet_faithful_loss_is_the_published_formula():
    """mean over spots of log(1 + BLEEP loss of the spot) + log(1 + MSE(reconstruction, image embedding)),
    the reconstruction being the plain mean of the image stream."""
    method = create_method("cmrcnet_faithful",
                           **TINY["cmrcnet_faithful"] | {"projection_dim": 16, "attention_dim": 16})
    method.dims = {"image_dim": 6, "n_genes": 5, "token_dim": 3, "n_tokens": 4}
    method.build(method.dims)
    method.net.eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 6, generator=gen), torch.rand(6, 5, generator=gen)
    tokens = torch.randn(6, 4, 3, generator=gen)
    with torch.no_grad():
        total = method._total(*method._losses(x, y, tokens, torch.Generator().manual_seed(7))).item()
        img, spot = method.net.image_head(x), method.net.expression_tower(y)
        mask = method.mask(6, torch.Generator().manual_seed(7))
        reconstructed = method.net.reconstructor(tokens, y, mask)
    rows = hand_bleep_rows(img.tolist(), spot.tolist(), 1.0)
    hand = sum(math.log1p(r) for r in rows) / len(rows) + math.log1p(hand_mse(reconstructed, img))
    assert total == pytest.approx(hand, rel=1e-5)
    # the per-spot log is what the test pins: the log of the batch mean differs
    assert abs(math.log1p(sum(rows) / len(rows)) - sum(math.log1p(r) for r in rows) / len(rows)) > 1e-3
    assert isinstance(method.net.reconstructor.out, nn.Identity)


def test_nh2st_faithful_loss_is_the_published_formula():
    """MSE(head(spot image), expression) + 1.0 InfoNCE(spot) + 0.5 InfoNCE(neighbourhood), InfoNCE one-way
    (image -> expression) at τ 0.05 with negatives x 0.1, hyperedges of 4 built on the image nodes."""
    method = create_method("nh2st_faithful", dim=16, fusion_heads=4, head_hidden=8)
    method.build({"image_dim": 6, "n_genes": 5})
    method.net.eval()
    gen = torch.Generator().manual_seed(2)
    image_nodes, expression_nodes = torch.randn(5, 7, 6, generator=gen), torch.rand(5, 7, 5, generator=gen)
    valid = torch.ones(5, 7, dtype=torch.bool)
    valid[0, 4:] = False
    with torch.no_grad():
        loss = method.batch_loss(image_nodes, expression_nodes, valid).item()
        img, _, img_tokens, incidence = method.net.image_side(image_nodes, valid)
        spot, spot_tokens = method.net.expression_side(expression_nodes, valid, incidence)
        a, b = method.net.fuse_spot(img, spot)
        na, nb = method.net.fuse_neighbourhood(img_tokens, spot_tokens, valid)
        prediction = method.net.head(method.net.image_encoder(image_nodes[:, 0]))
    hand = (hand_mse(prediction, expression_nodes[:, 0]) + hand_nh2st_infonce(a.tolist(), b.tolist())
            + 0.5 * hand_nh2st_infonce(na.tolist(), nb.tolist()))
    assert loss == pytest.approx(hand, rel=1e-5)
    torch.testing.assert_close(incidence, knn_hypergraph(image_nodes, valid, 4))
    members = incidence.sum(dim=1)  # nodes per hyperedge
    assert (members[1:] == 4).all() and (members[0, :4] == 4).all() and (members[0, 4:] == 0).all()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_cosine_schedule_is_cmrcnets_and_step_schedule_is_steplr():
    param = nn.Parameter(torch.zeros(1))
    cosine = TrainConfig(epochs=60, lr=1e-4, schedule="cosine", min_lr=1e-5)
    optimiser = torch.optim.AdamW([param], lr=1e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, 60, eta_min=1e-5)
    for epoch in range(60):
        reference.step()  # CMRCNet steps its scheduler before each epoch
        assert learning_rate(cosine, epoch) == pytest.approx(reference.get_last_lr()[0], rel=1e-9)
    assert learning_rate(cosine, 59) == pytest.approx(1e-5)
    step = TrainConfig(epochs=200, lr=5e-4, schedule="step", step_epochs=50, gamma=0.9)
    reference = torch.optim.lr_scheduler.StepLR(torch.optim.Adam([param], lr=5e-4), 50, 0.9)
    for epoch in range(200):
        assert learning_rate(step, epoch) == pytest.approx(reference.get_last_lr()[0], rel=1e-9)
        reference.step()  # Lightning steps it after each epoch


def test_the_training_loop_follows_the_schedule():
    """With a constant gradient, each Adam step moves a parameter by the learning rate of its epoch."""
    module = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(module.weight)
    seen: list[float] = []
    config = TrainConfig(epochs=4, batch_size=2, lr=1e-2, weight_decay=0.0, grad_clip=None,
                         schedule="step", step_epochs=2, gamma=0.5)
    fit_minibatches(module, 2, lambda idx: module.weight.sum(), config, seed=0,
                    before_epoch=lambda: seen.append(module.weight.item()))
    seen.append(module.weight.item())
    steps = -np.diff(seen)
    np.testing.assert_allclose(steps, [learning_rate(config, e) for e in range(4)], rtol=1e-5)


def test_bernoulli_mask_masks_each_entry_with_the_ratio():
    """CMRCNet's mask: ``rand < 0.5`` per entry, so the count varies from spot to spot."""
    mask = random_mask((64, 10, 32), 0.5, "bernoulli", torch.Generator().manual_seed(0))
    assert mask.shape == (64, 10, 32) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.5) < 0.01
    assert mask.reshape(64, -1).sum(1).unique().numel() > 1


# ============================================================================ presets end to end
def test_faithful_presets_carry_the_published_choices():
    cmrc = create_method("cmrcnet_faithful").config
    assert (cmrc.loss, cmrc.temperature, cmrc.learn_temperature, cmrc.negatives, cmrc.expression_encoder,
            cmrc.weighting, cmrc.top_k) == ("bleep_soft", 1.0, False, "batch", "projection", "average", 50)
    assert (cmrc.reconstructor, cmrc.mask_mode, cmrc.mask_ratio, cmrc.log_losses, cmrc.log_per_spot,
            cmrc.fusion_depth, cmrc.expression_tokens) == ("cmrcnet", "bernoulli", 0.5, True, True, 2, 8)
    assert (cmrc.train.lr, cmrc.train.min_lr, cmrc.train.schedule, cmrc.train.epochs, cmrc.train.batch_size,
            cmrc.train.weight_decay, cmrc.train.grad_clip) == (1e-4, 1e-5, "cosine", 60, 64, 1e-3, None)
    nh = create_method("nh2st_faithful").config
    assert (nh.dim, nh.structure, nh.hyperedge_k, nh.hyperedges, nh.symmetric_infonce, nh.temperature,
            nh.negative_weight, nh.head_neighbour_context, nh.standardize_targets, nh.neighbour_k) == (
        512, "nh2st", 4, "image", False, 0.05, 0.1, False, False, 8)
    train = nh.train
    assert (train.lr, train.weight_decay, train.schedule, train.step_epochs, train.gamma, train.batch_size,
            train.epochs, train.patience, train.min_delta, train.grad_clip) == (
        5e-4, 0.0, "step", 50, 0.9, 8, 200, 20, 0.0, None)
    # he2st's variants keep their defaults
    assert create_method("cmrcnet").config.reconstructor == "he2st"
    assert create_method("nh2st").config.structure == "he2st"


@pytest.mark.parametrize("name", ["cmrcnet_faithful", "nh2st_faithful"])
def test_faithful_presets_fit_predict_and_roundtrip(name, tmp_path):
    spots = synthetic_spots()
    train, val, test = split(spots)
    method = create_method(name, **TINY[name])
    method.panel = GenePanel(genes=spots.genes)
    log = method.fit(train, val)
    assert np.isfinite(log.curves["train_loss"]).all()
    pred = method.predict(test.without_expression()).expression
    assert pred.shape == (len(test), 12) and np.isfinite(pred).all()
    assert mean_pearson(pred, test.targets) > 0.3, f"{name} learned nothing"
    back = load_method(method.save(tmp_path / f"{name}.pt"))
    assert type(back) is type(method) and back.config == method.config
    np.testing.assert_array_equal(back.predict(test).expression, pred)


def test_cmrcnet_end_to_end_trains_its_encoder():
    """CMRCNet trains its ViT from scratch: the fine-tuning path with a tiny timm ViT, tokens from the
    encoder's own spatial map."""
    spots = synthetic_spots(n_per_sample=24)
    rng = np.random.default_rng(0)
    spots.patches = rng.integers(0, 255, size=(len(spots), 32, 32, 3), dtype=np.uint8)
    train, test = spots.subset(np.arange(48)), spots.subset(np.arange(48, 72))
    method = create_method("cmrcnet_faithful", **TINY["cmrcnet_faithful"] | {
        "finetune_encoder": True, "encoder": "test_vit", "encoder_pretrained": False,
        "train": {"epochs": 1, "batch_size": 16}})
    method.panel = GenePanel(genes=spots.genes)
    assert method.uses_patches
    method.fit(train)
    encoder = method.net.encoder
    assert all(p.requires_grad for p in encoder.parameters())
    assert method.dims["n_tokens"] == 100 and method.dims["token_dim"] == encoder.embed_dim
    pred = method.predict(test).expression
    assert pred.shape == (24, 12) and np.isfinite(pred).all()
    with pytest.raises(He2stError, match="negatives='batch'"):
        create_method("cmrcnet", finetune_encoder=True)  # he2st's bank of every spot needs frozen features


# ============================================================================ CMRCNet's reconstruction
def reconstruction_errors(method, spots, seed: int = 0) -> dict[str, float]:
    """MSE of the reconstructed image embedding on ``spots`` at several mask ratios, and at the training
    ratio with the expression (or the image tokens) shuffled across spots."""
    method.net.eval()
    x = torch.from_numpy(method.scaler(spots.features))
    y = torch.from_numpy(spots.targets)
    tokens = method.image_tokens(spots)
    shape = (len(x), method.dims["n_tokens"], method.config.attention_dim)
    out = {}
    with torch.no_grad():
        target = method.net.image_head(x)

        def error(ratio: float, t: torch.Tensor, e: torch.Tensor) -> float:
            mask = random_mask(shape, ratio, "element", torch.Generator().manual_seed(seed))
            return F.mse_loss(method.net.reconstructor(t, e, mask), target).item()

        for ratio in (0.5, 0.75, 0.95):
            out[ratio] = error(ratio, tokens, y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        out["expression_shuffled"] = error(0.5, tokens, y[perm])
        out["image_shuffled"] = error(0.5, tokens[perm], y)
    return out


@pytest.mark.parametrize("tokens", [False, True])
def test_cmrcnet_reconstruction_reads_the_masked_image(tokens):
    """The `no_reconstruction` ablation tests CMRCNet's idea only if the reconstruction uses the masked
    image: masking more of it, or giving it another spot's image or expression, must cost accuracy."""
    spots = synthetic_spots(tokens=tokens)
    train, val, _ = split(spots)
    method = create_method("cmrcnet", **SMALL["cmrcnet"] | {"train": EPOCHS | {"epochs": 30, "patience": 30}})
    method.panel = GenePanel(genes=spots.genes)
    method.fit(train, val)
    err = reconstruction_errors(method, train)
    assert err[0.5] < err[0.75] < err[0.95], err
    assert err[0.95] > 1.5 * err[0.5], err
    assert err["image_shuffled"] > 1.5 * err[0.5] and err["expression_shuffled"] > 1.5 * err[0.5], err
