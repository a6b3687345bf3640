"""Losses, neural blocks and retrieval prediction: checked against hand/brute-force computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from he2st.io import MARKER
import torch.nn.functional as F

from he2st.errors import He2stError
from he2st.methods.layers.losses import (
    ContrastiveLoss,
    EmbeddingQueue,
    NegativeBank,
    bleep_soft_clip_loss,
    expression_similarity_targets,
    info_nce,
    reference_contrastive_loss,
)
from he2st.methods.layers.nn import BidirectionalFusion, CrossAttentionBlock, MLPEncoder, ProjectionHead
from he2st.methods.layers.bank import ReferenceBank

IMG = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
SPOT = [[0.5, 0.2], [0.1, 0.9], [0.7, 0.6]]


# ------------------------------------------------------------------ losses
def _hand_bleep_loss(img: list[list[float]], spot: list[list[float]], tau: float) -> float:
    """BLEEP's fixed soft-target loss written out with plain loops."""
    n = len(img)

    def dot(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v, strict=True))

    logits = [[dot(spot[i], img[j]) / tau for j in range(n)] for i in range(n)]
    sim = [[(dot(img[i], img[j]) + dot(spot[i], spot[j])) / 2 / tau for j in range(n)] for i in range(n)]
    targets = []
    for i in range(n):
        z = sum(math.exp(s) for s in sim[i])
        targets.append([math.exp(s) / z for s in sim[i]])
    total = 0.0
    for i in range(n):
        row_lse = math.log(sum(math.exp(logits[i][j]) for j in range(n)))
        spots_loss = -sum(targets[i][j] * (logits[i][j] - row_lse) for j in range(n))
        col_lse = math.log(sum(math.exp(logits[j][i]) for j in range(n)))
        images_loss = -sum(targets[j][i] * (logits[j][i] - col_lse) for j in range(n))
        total += (spots_loss + images_loss) / 2
    return total / n


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_bleep_loss_matches_hand_computation(tau: float) -> None:
    img, spot = torch.tensor(IMG, dtype=torch.float64), torch.tensor(SPOT, dtype=torch.float64)
    got = bleep_soft_clip_loss(img, spot, tau)
    assert got.item() == pytest.approx(_hand_bleep_loss(IMG, SPOT, tau), rel=1e-12)


def test_bleep_loss_is_not_normalised() -> None:
    img, spot = torch.tensor(IMG), torch.tensor(SPOT)
    assert bleep_soft_clip_loss(2 * img, spot).item() != pytest.approx(bleep_soft_clip_loss(img, spot).item())


def test_contrastive_loss_queue_gradients_only_reach_batch() -> None:
    torch.manual_seed(0)
    img = torch.randn(8, 16, requires_grad=True)
    spot = torch.randn(8, 16, requires_grad=True)
    queue_img = F.normalize(torch.randn(32, 16), dim=1).requires_grad_()
    queue_spot = F.normalize(torch.randn(32, 16), dim=1).requires_grad_()
    loss_fn = ContrastiveLoss()
    loss_fn(img, spot, queue_img, queue_spot).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert spot.grad is not None and spot.grad.abs().sum() > 0
    assert queue_img.grad is None and queue_spot.grad is None
    assert loss_fn.log_temperature.grad is not None


@pytest.mark.parametrize("soft", [True, False])
def test_more_negatives_raise_the_loss(soft: bool) -> None:
    torch.manual_seed(1)
    img, spot = torch.randn(16, 32), torch.randn(16, 32)
    queue_img = F.normalize(torch.randn(256, 32), dim=1)
    queue_spot = F.normalize(torch.randn(256, 32), dim=1)
    loss_fn = ContrastiveLoss(soft_targets=soft)
    base = loss_fn(img, spot).item()
    small = loss_fn(img, spot, queue_img[:64], queue_spot[:64]).item()
    large = loss_fn(img, spot, queue_img, queue_spot).item()
    assert base < small < large


def test_hard_contrastive_loss_is_symmetric_infonce() -> None:
    torch.manual_seed(2)
    img, spot = torch.randn(6, 8), torch.randn(6, 8)
    loss_fn = ContrastiveLoss(soft_targets=False)
    logits = F.normalize(img, dim=1) @ F.normalize(spot, dim=1).T / 0.07
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss_fn(img, spot).item() == pytest.approx(expected.item(), rel=1e-5)


def test_learnable_temperature_is_a_clamped_parameter() -> None:
    loss_fn = ContrastiveLoss(init_temperature=0.07)
    assert any(p is loss_fn.log_temperature for p in loss_fn.parameters())
    assert loss_fn.temperature == pytest.approx(0.07)
    img, spot = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(50.0))
    assert loss_fn.temperature == pytest.approx(1.0)
    loss_fn(img, spot)
    assert loss_fn.log_temperature.item() == pytest.approx(0.0, abs=1e-6)  # parameter itself clamped
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-5))
    loss_fn(img, spot)
    assert math.exp(loss_fn.log_temperature.item()) == pytest.approx(0.01)
    assert not any(p.requires_grad for p in ContrastiveLoss(learn_temperature=False).parameters())


def test_embedding_queue_is_fifo_and_normalised() -> None:
    queue = EmbeddingQueue(dim=2, size=3)
    assert len(queue) == 0 and queue.tensor().shape == (0, 2)
    queue.enqueue(torch.tensor([[3.0, 4.0], [0.0, 2.0]], requires_grad=True))
    assert torch.allclose(queue.tensor(), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert not queue.tensor().requires_grad
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert len(queue) == 3
    assert torch.allclose(queue.tensor(), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]))
    # more rows than capacity: only the last three are kept, still oldest first
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]))
    r = math.sqrt(0.5)
    assert torch.allclose(queue.tensor(), torch.tensor([[-1.0, 0.0], [0.0, -1.0], [r, r]]))
    assert "buffer" in queue.state_dict()


def test_info_nce_with_unit_weight_is_standard_symmetric_infonce() -> None:
    torch.manual_seed(3)
    a, b = torch.randn(10, 12), torch.randn(10, 12)
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.05
    labels = torch.arange(10)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert info_nce(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
    assert info_nce(a, b, negative_weight=0.5).item() != pytest.approx(expected.item())


def test_info_nce_weight_scales_only_negatives() -> None:
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # sim = [[1, 0], [0.6, 0.8]]; with weight 0.5 off-diagonals become 0 and 0.3
    logits = torch.tensor([[1.0, 0.0], [0.3, 0.8]]) / 0.05
    labels = torch.arange(2)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert info_nce(a, b, negative_weight=0.5).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ nn
def test_projection_head_matches_formula() -> None:
    torch.manual_seed(4)
    head = ProjectionHead(5, 4, dropout=0.1).eval()
    x = torch.randn(3, 5)
    w1, b1 = head.projection.weight, head.projection.bias
    w2, b2 = head.fc.weight, head.fc.bias
    projected = x @ w1.T + b1
    h = F.gelu(projected) @ w2.T + b2 + projected
    mu = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    expected = (h - mu) / torch.sqrt(var + 1e-5) * head.layer_norm.weight + head.layer_norm.bias
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_mlp_encoder_shapes() -> None:
    assert MLPEncoder(30, hidden=(64, 32), out_dim=16)(torch.randn(7, 30)).shape == (7, 16)
    assert MLPEncoder(30, hidden=(), out_dim=16)(torch.randn(7, 30)).shape == (7, 16)


def test_attention_block_shapes() -> None:
    block = CrossAttentionBlock(dim=32, heads=4)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    assert block(q, kv).shape == (2, 5, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, -3:] = True
    assert block(q, kv, context_padding_mask=mask).shape == (2, 5, 32)
    fusion = BidirectionalFusion(dim=32, heads=4, depth=2)
    a, b = fusion(q, kv)
    assert a.shape == (2, 5, 32) and b.shape == (2, 9, 32)


# ------------------------------------------------------------------ retrieval
def _bank(n: int = 200, d: int = 16, g: int = 12, seed: int = 0) -> ReferenceBank:
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(g)]
    samples = [f"S{i % 3}" for i in range(n)]
    return ReferenceBank(rng.normal(size=(n, d)), rng.gamma(2.0, size=(n, g)), genes, samples)


def _brute_force_topk(bank_emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    b = bank_emb / np.linalg.norm(bank_emb, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ b.T), axis=1, kind="stable")[:, :k]


def test_average_prediction_equals_brute_force_mean() -> None:
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(200, 16))
    expr = rng.gamma(2.0, size=(200, 12)).astype(np.float32)
    bank = ReferenceBank(raw, expr, [f"G{i}" for i in range(12)])
    queries = rng.normal(size=(25, 16))
    result = bank.predict(queries, k=7, backend="exact")
    top = _brute_force_topk(raw, queries, 7)
    np.testing.assert_array_equal(result.indices, top)
    np.testing.assert_allclose(result.expression, expr[top].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(result.dispersion, expr[top].std(axis=1).mean(axis=1), rtol=1e-4)
    np.testing.assert_allclose(result.best_similarity, result.similarities[:, 0])
    assert result.genes == bank.genes


def test_per_sample_retrieval_gives_each_reference_slide_an_equal_say() -> None:
    """A slide-wide shift (stain, scanner) draws a pooled top-k into one slide; per-sample retrieval
    averages each slide's own nearest spots, whatever that shift."""
    rng = np.random.default_rng(3)
    tissue = rng.normal(size=(120, 16))
    raw = np.concatenate([tissue, tissue[::-1] + 2.0])  # slide B: same kinds of tissue, shifted features
    expr = rng.gamma(2.0, size=(240, 12)).astype(np.float32)
    ids = ["A"] * 120 + ["B"] * 120
    bank = ReferenceBank(raw, expr, [f"G{i}" for i in range(12)], ids)
    queries = tissue[:20] + 2.5  # a query slide that looks more like B than A overall
    pooled = bank.predict(queries, k=5, backend="exact")
    assert (pooled.indices >= 120).all()  # every neighbour from slide B
    balanced = bank.predict(queries, k=5, backend="exact", per_sample=True)
    top_a, top_b = _brute_force_topk(raw[:120], queries, 5), _brute_force_topk(raw[120:], queries, 5)
    np.testing.assert_allclose(balanced.expression, (expr[top_a].mean(1) + expr[120:][top_b].mean(1)) / 2, rtol=1e-5)
    assert balanced.indices.shape == (20, 10) and (np.sort(balanced.indices, 1) == np.sort(
        np.concatenate([top_a, top_b + 120], 1), 1)).all()
    assert (np.diff(balanced.similarities, axis=1) <= 1e-6).all()  # best first, over both slides
    np.testing.assert_allclose(balanced.best_similarity, balanced.similarities[:, 0])
    assert np.shares_memory(bank._sample_banks()[0][1].expression, expr)  # contiguous rows: views, not copies
    shuffled = np.random.default_rng(4).permutation(240)
    mixed = ReferenceBank(raw[shuffled], expr[shuffled], bank.genes, np.asarray(ids)[shuffled].tolist())
    np.testing.assert_allclose(mixed.predict(queries, k=5, per_sample=True).expression, balanced.expression, rtol=1e-5)
    # one slide, or no sample ids: pooled
    for one in (ReferenceBank(raw, expr, bank.genes, ["A"] * 240), ReferenceBank(raw, expr, bank.genes)):
        np.testing.assert_array_equal(one.predict(queries, k=5, per_sample=True).indices, pooled.indices)


def test_search_is_chunked_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = _bank()
    queries = np.random.default_rng(2).normal(size=(30, 16))
    full = bank.search(queries, 5, backend="exact")
    monkeypatch.setattr("he2st.methods.layers.bank.MAX_BLOCK_ELEMENTS", 3 * len(bank))
    chunked = bank.search(queries, 5, backend="exact")
    np.testing.assert_array_equal(full[1], chunked[1])
    np.testing.assert_allclose(full[0], chunked[0], atol=1e-6)  # BLAS blocking may change the last bit


@pytest.mark.parametrize("weighting", ["softmax", "similarity"])
def test_weighted_predictions_are_convex_combinations(weighting: str) -> None:
    bank = _bank()
    queries = np.random.default_rng(3).normal(size=(10, 16))
    result = bank.predict(queries, k=5, weighting=weighting, temperature=0.05, backend="exact")
    # weights sum to 1: a bank whose only gene is constant 1 predicts exactly the weight sum
    ones = ReferenceBank(bank.embeddings, np.ones((len(bank), 1)), ["one"], normalize=False)
    np.testing.assert_allclose(
        ones.predict(queries, k=5, weighting=weighting, temperature=0.05).expression, 1.0, rtol=1e-6
    )
    sims = result.similarities
    if weighting == "softmax":
        w = np.exp(sims / 0.05) / np.exp(sims / 0.05).sum(axis=1, keepdims=True)
    else:
        w = np.maximum(sims, 0) / np.maximum(sims, 0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    profiles = bank.expression[result.indices]  # (n, k, G)
    np.testing.assert_allclose(result.expression, (w[:, :, None] * profiles).sum(axis=1), rtol=1e-4)


def test_similarity_weighting_falls_back_to_uniform_when_all_negative() -> None:
    bank = ReferenceBank([[1.0, 0.0], [0.0, 1.0]], [[2.0], [4.0]], ["A"])
    result = bank.predict([[-1.0, -1.0]], k=2, weighting="similarity")
    np.testing.assert_allclose(result.expression, [[3.0]])


def test_dispersion_zero_when_neighbours_identical() -> None:
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(20, 8))
    expr = np.tile(rng.gamma(2.0, size=(1, 6)), (20, 1))
    bank = ReferenceBank(emb, expr, [f"G{i}" for i in range(6)])
    for weighting in ("average", "softmax", "similarity"):
        result = bank.predict(rng.normal(size=(5, 8)), k=10, weighting=weighting)
        np.testing.assert_allclose(result.dispersion, 0.0, atol=1e-6)
        np.testing.assert_allclose(result.expression, expr[:5], rtol=1e-6)


def test_gene_selection_reorders_and_rejects_unknown() -> None:
    bank = _bank()
    queries = np.random.default_rng(5).normal(size=(4, 16))
    full = bank.predict(queries, k=3)
    picked = bank.predict(queries, k=3, genes=["G5", "G0"])
    assert picked.genes == ["G5", "G0"]
    np.testing.assert_allclose(picked.expression, full.expression[:, [5, 0]], rtol=1e-6)
    with pytest.raises(He2stError, match="NOPE1, NOPE2"):
        bank.predict(queries, k=3, genes=["G1", "NOPE1", "NOPE2"])


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_bank_save_load_round_trip(tmp_path, suffix: str) -> None:
    bank = _bank()
    path = tmp_path / f"bank{suffix}"
    bank.save(path)
    assert [p.name for p in tmp_path.iterdir() if p.name != MARKER] == [path.name]  # no leftover temp file
    loaded = ReferenceBank.load(path)
    np.testing.assert_array_equal(loaded.embeddings, bank.embeddings)
    np.testing.assert_array_equal(loaded.expression, bank.expression)
    assert loaded.genes == bank.genes and loaded.sample_ids == bank.sample_ids
    queries = np.random.default_rng(6).normal(size=(3, 16))
    np.testing.assert_array_equal(
        loaded.predict(queries, k=4).expression, bank.predict(queries, k=4).expression
    )


def test_bank_rejects_bad_input(tmp_path) -> None:
    bank = _bank()
    with pytest.raises(He2stError, match="dimension"):
        bank.search(np.zeros((2, 5)), 3)
    with pytest.raises(He2stError, match="k=500"):
        bank.search(np.ones((2, 16)), 500)
    with pytest.raises(He2stError, match="gene names"):
        ReferenceBank(np.ones((3, 2)), np.ones((3, 4)), ["a", "b"])
    with pytest.raises(He2stError, match=r"\.h5"):
        bank.save(tmp_path / "bank.pkl")
    with pytest.raises(He2stError, match="not found"):
        ReferenceBank.load(tmp_path / "missing.h5")


def test_negative_bank_is_the_whole_set_loss_when_fresh_and_small() -> None:
    """With a fresh bank and fewer spots than n_negatives, the batch is scored against itself plus every
    bank spot, with soft targets from expression similarity over that same set (hand computation)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 6, generator=g)
    a_all, b_all = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    bank = NegativeBank(z, n_negatives=64, target_temperature=0.1, generator=g)
    bank.refresh(a_all, b_all)
    idx = torch.tensor([3, 7, 11])
    a, b = a_all[idx].clone().requires_grad_(), b_all[idx].clone().requires_grad_()
    got = bank.loss(idx, a, b, 0.2)
    rows = torch.cat([idx, torch.arange(20)])
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    expected = reference_contrastive_loss(a_ref, b_ref, torch.cat([a_ref, a_all]), torch.cat([b_ref, b_all]),
                                          expression_similarity_targets(z[idx], z[rows], 0.1), 0.2)
    torch.testing.assert_close(got, expected)
    got.backward()
    expected.backward()
    # the live batch learns, through its own columns too, as in the one-product form; the bank is detached
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)


def test_negative_bank_cost_does_not_grow_with_the_number_of_spots() -> None:
    """Each step reads batch + n_negatives columns, however many spots the bank holds (linear cost)."""
    g = torch.Generator().manual_seed(0)
    seen = []
    for n in (1_000, 50_000):
        bank = NegativeBank(torch.randn(n, 4, generator=g), n_negatives=128, target_temperature=0.1, generator=g)
        bank.refresh(torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g))
        idx = torch.arange(32)
        captured = {}

        from he2st.methods.layers import losses

        def spy(logits, targets, captured=captured, real=losses._soft_cross_entropy):
            captured["columns"] = logits.shape[1]
            return real(logits, targets)

        original, losses._soft_cross_entropy = losses._soft_cross_entropy, spy
        try:
            bank.loss(idx, torch.randn(32, 8), torch.randn(32, 8), 0.1)
        finally:
            losses._soft_cross_entropy = original
        seen.append(captured["columns"])
    assert seen == [32 + 128, 32 + 128]
