"""Building blocks shared by the BLEEP successors (CMRCNet, NH2ST, CarHE).

Each piece is written once here and used by every method that needs it:

* spatial neighbourhoods from physical spot distance, never crossing samples
  (:func:`spatial_neighbours`, :func:`sample_neighbour`, :func:`masked_mean`);
* layers over a spot's neighbourhood -- self-attention (:class:`NeighbourhoodAttention`) or
  NH2ST's k-NN hypergraph convolution (:class:`NeighbourhoodHypergraph`) -- and cross-modal
  fusion with padding masks (:func:`fuse`);
* masking for masked reconstruction (:func:`random_mask`, :func:`apply_mask`), image tokens from a
  flat feature vector (:func:`feature_chunks`) and expression tokens (:class:`ExpressionTokenizer`);
* losses beyond :mod:`he2st.methods.losses`: the image↔expression alignment with he2st's options
  (:class:`AlignmentLoss`) and a multi-positive InfoNCE for image↔image learning
  (:func:`multi_positive_nce`), plus feature-space augmentation (:func:`feature_augment`);
* the retrieval side of a contrastive method (:class:`RetrievalMixin`, :class:`RetrievalConfig`):
  a reference bank of expression embeddings queried with image embeddings, as BLEEP does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy.spatial import cKDTree
from torch import nn

from he2st.data.spots import SpotSet
from he2st.errors import He2stError
from he2st.methods.base import MethodConfig, Prediction
from he2st.methods.losses import ContrastiveLoss, bleep_soft_clip_loss, reference_contrastive_loss
from he2st.methods.nn import BidirectionalFusion, CrossAttentionBlock, MLPEncoder, ProjectionHead
from he2st.predict.retrieval import ReferenceBank

__all__ = [
    "AlignmentLoss",
    "ExpressionTokenizer",
    "HypergraphConv",
    "NeighbourhoodAttention",
    "NeighbourhoodHypergraph",
    "RetrievalConfig",
    "RetrievalMixin",
    "apply_mask",
    "expression_tower",
    "feature_augment",
    "feature_chunks",
    "fuse",
    "knn_hypergraph",
    "masked_mean",
    "neighbour_context",
    "multi_positive_nce",
    "neighbourhood_layer",
    "random_mask",
    "sample_neighbour",
    "spatial_neighbours",
    "standardize_columns",
]


# ====================================================================== neighbourhoods
def spatial_neighbours(
    coords_um: np.ndarray, sample_ids: Sequence, k: int, max_distance_um: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` physically nearest other spots of every spot, within its own sample only.

    ``coords_um`` ``(N, 2)`` are spot centres in micrometres, ``sample_ids`` ``(N,)`` the sample of
    each spot. Returns ``index`` ``(N, k)`` (row numbers into the same arrays, nearest first) and
    ``valid`` ``(N, k)``. A slot is invalid when the sample has fewer than ``k + 1`` spots or the
    neighbour is farther than ``max_distance_um``; invalid slots hold the spot's own row (safe to
    gather) and must be masked. The spot itself is never its own neighbour, spots of another
    sample never are, and ties are broken deterministically (k-d tree order).
    """
    coords = np.asarray(coords_um, dtype=np.float64)
    ids = np.asarray(sample_ids)
    n = len(coords)
    if coords.shape != (n, 2) or len(ids) != n:
        raise He2stError(
            f"coords_um must be (N, 2) with one sample id per row, got {coords.shape} and {len(ids)}"
        )
    if k < 0:
        raise He2stError(f"k must be >= 0, got {k}")
    index = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)
    valid = np.zeros((n, k), dtype=bool)
    if k == 0 or n == 0:
        return index, valid
    for sid in np.unique(ids.astype(str)):
        rows = np.flatnonzero(ids.astype(str) == sid)
        m = len(rows)
        if m < 2:
            continue
        kk = min(k + 1, m)
        dist, nb = cKDTree(coords[rows]).query(coords[rows], k=kk)
        is_self = nb == np.arange(m)[:, None]
        is_self[~is_self.any(axis=1), -1] = True  # duplicated coordinates: self may fall outside the top kk
        keep = ~is_self
        nb, dist = nb[keep].reshape(m, kk - 1), dist[keep].reshape(m, kk - 1)
        ok = np.isfinite(dist)
        if max_distance_um is not None:
            ok &= dist <= max_distance_um
        index[rows, : kk - 1] = np.where(ok, rows[nb], rows[:, None])
        valid[rows, : kk - 1] = ok
    return index, valid


def sample_neighbour(
    index: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One uniformly drawn valid neighbour of each row in ``rows`` (the row itself if it has none)."""
    weights = valid[rows].float()
    has = weights.sum(dim=1) > 0
    out = rows.clone()
    if has.any():
        pick = torch.multinomial(weights[has], 1, generator=generator).squeeze(1)
        out[has] = index[rows[has], pick]
    return out


def neighbour_context(
    embeddings: np.ndarray, coords_um: np.ndarray, sample_ids: Sequence, k: int,
    max_distance_um: float | None = None,
) -> np.ndarray:
    """Each spot's L2-normalised embedding averaged with those of its ``k`` physically nearest spots
    of the same sample (NH2ST's neighbourhood context, applied to image embeddings at query time:
    neighbouring tissue is seen, never its expression). Spots without neighbours keep their own."""
    z = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    if k == 0 or len(z) == 0:
        return z.astype(np.float32)
    index, valid = spatial_neighbours(coords_um, sample_ids, k, max_distance_um)
    total = z + (z[index] * valid[:, :, None]).sum(axis=1)
    return (total / (1 + valid.sum(axis=1, keepdims=True))).astype(np.float32)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``(B, n, d)`` over the nodes where ``valid`` ``(B, n)`` is True."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


# ====================================================================== neighbourhood layers
class NeighbourhoodAttention(nn.Module):
    """Self-attention over a spot and its neighbours: ``(B, n, dim)`` nodes -> ``(B, n, dim)``.

    Pre-norm transformer blocks (:class:`~he2st.methods.nn.CrossAttentionBlock` with the node set
    as both queries and context); padded neighbours (``valid`` False) receive no attention and come
    out as zeros. Node 0 is expected to be the spot itself, which is always valid.
    """

    def __init__(
        self, dim: int, heads: int = 4, depth: int = 1, mlp_ratio: float = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        padding = ~valid
        for block in self.blocks:
            x = block(x, x, padding)
        return self.norm(x) * valid.unsqueeze(-1).to(x.dtype)


@torch.no_grad()
def knn_hypergraph(x: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """NH2ST's hypergraph over each neighbourhood: one hyperedge per valid node, holding that node
    and its ``k - 1`` most cosine-similar valid nodes. Returns the incidence ``(B, nodes, edges)``."""
    batch, n, _ = x.shape
    z = F.normalize(x.detach().float(), dim=-1)
    sim = z @ z.transpose(1, 2)  # (B, centre, node)
    sim = sim.masked_fill(~valid[:, None, :], float("-inf"))
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf"))
    values, members = sim.topk(min(k, n), dim=-1)
    member_ok = (values > float("-inf")) & valid[:, :, None]
    edges = torch.zeros(batch, n, n, dtype=x.dtype, device=x.device)  # (B, edge, node)
    edges.scatter_(2, members, member_ok.to(x.dtype))
    return edges.transpose(1, 2)


class HypergraphConv(nn.Module):
    """Hypergraph convolution ``X' = D_v^-1 H D_e^-1 H^T X Θ + b`` (unit edge weights), batched.

    ``x`` ``(B, nodes, in_dim)``, incidence ``H`` ``(B, nodes, edges)``: nodes send to the edges
    they belong to (mean), edges send back to their nodes (mean). Nodes in no edge get the bias.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
        xt = self.linear(x)
        edge_degree = incidence.sum(dim=1).clamp(min=1.0).unsqueeze(-1)  # (B, edges, 1)
        node_degree = incidence.sum(dim=2).clamp(min=1.0).unsqueeze(-1)  # (B, nodes, 1)
        edge_features = incidence.transpose(1, 2) @ xt / edge_degree
        return incidence @ edge_features / node_degree + self.bias


class NeighbourhoodHypergraph(nn.Module):
    """NH2ST's neighbour branch: a k-NN hypergraph over the neighbourhood's nodes (built once from
    the input features) and ``depth`` hypergraph convolutions ``dim -> hidden -> ... -> dim`` with
    GELU and dropout between them. ``(B, n, dim)`` -> ``(B, n, dim)``; padded nodes come out as zeros."""

    def __init__(
        self, dim: int, hidden: int | None = None, depth: int = 2, hyperedge_k: int = 3, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        hidden = hidden or 2 * dim
        widths = [dim] + [hidden] * (depth - 1) + [dim]
        self.convs = nn.ModuleList(HypergraphConv(a, b) for a, b in itertools.pairwise(widths))
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.hyperedge_k = hyperedge_k

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        incidence = knn_hypergraph(x, valid, self.hyperedge_k)
        keep = valid.unsqueeze(-1).to(x.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x, incidence)
            if i < len(self.convs) - 1:
                x = self.dropout(self.act(x))
        return x * keep


def neighbourhood_layer(
    kind: Literal["hypergraph", "attention"],
    dim: int,
    heads: int = 4,
    depth: int = 2,
    hyperedge_k: int = 3,
    dropout: float = 0.1,
) -> nn.Module:
    """The neighbour-branch layer chosen by a method's config."""
    if kind == "hypergraph":
        return NeighbourhoodHypergraph(dim, 2 * dim, depth, hyperedge_k, dropout)
    if kind == "attention":
        return NeighbourhoodAttention(dim, heads, depth, mlp_ratio=2, dropout=dropout)
    raise He2stError(f"unknown neighbourhood layer {kind!r}; use 'hypergraph' or 'attention'")


def fuse(
    fusion: BidirectionalFusion,
    a: torch.Tensor,
    b: torch.Tensor,
    a_valid: torch.Tensor | None = None,
    b_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a :class:`~he2st.methods.nn.BidirectionalFusion` with padding masks on both streams
    (``True`` = real token), so padded neighbours are never attended to."""
    a_pad = None if a_valid is None else ~a_valid
    b_pad = None if b_valid is None else ~b_valid
    for block_a, block_b in zip(fusion.a_from_b, fusion.b_from_a, strict=True):
        a, b = block_a(a, b, b_pad), block_b(b, a, a_pad)
    return fusion.norm_a(a), fusion.norm_b(b)


# ====================================================================== masking and tokens
def random_mask(
    shape: tuple[int, int, int],
    ratio: float,
    mode: Literal["element", "token"] = "element",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask ``(B, T, C)``, True = masked, with *exactly* ``round(ratio · n)`` masked entries
    per sample: ``n = T · C`` single elements (``element``, CMRCNet) or ``n = T`` whole tokens
    (``token``, MAE-style). Positions are drawn uniformly without replacement."""
    if not 0.0 <= ratio < 1.0:
        raise He2stError(f"mask ratio must be in [0, 1), got {ratio}")
    if mode not in ("element", "token"):
        raise He2stError(f"unknown mask mode {mode!r}; use 'element' or 'token'")
    batch, tokens, channels = shape
    n = tokens * channels if mode == "element" else tokens
    masked = round(ratio * n)
    ranks = torch.rand(batch, n, generator=generator).argsort(dim=1).argsort(dim=1)
    mask = ranks < masked
    if mode == "element":
        return mask.view(batch, tokens, channels)
    return mask[:, :, None].expand(batch, tokens, channels)


def apply_mask(
    tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None = None
) -> torch.Tensor:
    """Replace masked entries by zero, or by a learned ``(C,)`` mask token."""
    fill = torch.zeros((), dtype=tokens.dtype) if mask_token is None else mask_token.to(tokens.dtype)
    return torch.where(mask.to(tokens.device), fill, tokens)


def feature_chunks(features: np.ndarray | torch.Tensor, n_tokens: int) -> np.ndarray | torch.Tensor:
    """A flat ``(N, D)`` feature vector as ``(N, T, ceil(D / T))`` tokens: consecutive chunks of the
    vector, the last zero-padded -- the stand-in for spatial tokens when only pooled features exist."""
    width = -(-features.shape[1] // n_tokens)
    pad = width * n_tokens - features.shape[1]
    if isinstance(features, torch.Tensor):
        return F.pad(features, (0, pad)).reshape(features.shape[0], n_tokens, width)
    return np.pad(features, ((0, 0), (0, pad))).reshape(features.shape[0], n_tokens, width)


class ExpressionTokenizer(nn.Module):
    """Expression vector -> ``T`` tokens: ``Linear -> SELU -> AlphaDropout -> Linear``, reshaped to
    ``(..., T, dim)`` (CMRCNet's self-normalising "SNN" block; ``self_normalising=False`` uses GELU
    and plain dropout)."""

    def __init__(
        self,
        n_genes: int,
        n_tokens: int,
        dim: int,
        hidden: int = 1024,
        dropout: float = 0.1,
        self_normalising: bool = True,
    ) -> None:
        super().__init__()
        self.n_tokens, self.dim = n_tokens, dim
        act, drop = (
            (nn.SELU(), nn.AlphaDropout(dropout)) if self_normalising else (nn.GELU(), nn.Dropout(dropout))
        )
        self.net = nn.Sequential(nn.Linear(n_genes, hidden), act, drop, nn.Linear(hidden, n_tokens * dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y).view(*y.shape[:-1], self.n_tokens, self.dim)


def feature_augment(
    x: torch.Tensor, dropout: float = 0.2, noise_std: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random view of standardised frozen features: inverted dropout of single dimensions plus
    Gaussian noise -- the feature-space stand-in for image augmentation when the encoder is frozen."""
    out = x
    if dropout > 0:
        keep = (torch.rand(x.shape, generator=generator) >= dropout).to(x.dtype)
        out = out * keep / (1.0 - dropout)
    if noise_std > 0:
        out = out + noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return out


def standardize_columns(x: np.ndarray) -> np.ndarray:
    """Per-column z-scores (as float32), used for expression-similarity soft targets."""
    return ((x - x.mean(0)) / np.maximum(x.std(0), 1e-6)).astype(np.float32)


def clean_proportions(props: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows normalised to sum 1 (negatives clipped) and a mask of usable rows (finite, positive sum):
    deconvolution tables carry NaN rows and tiny negative values that would break a simplex target."""
    props = np.asarray(props, dtype=np.float64)
    ok = np.isfinite(props).all(axis=1)
    clipped = np.where(np.isfinite(props), np.clip(props, 0, None), 0.0)
    total = clipped.sum(axis=1)
    ok &= total > 0
    normed = clipped / np.where(total > 0, total, 1.0)[:, None]
    return normed.astype(np.float32), ok


# ====================================================================== losses
class AlignmentLoss(nn.Module):
    """Contrastive alignment of two modalities with he2st's options, in one module.

    ``kind="bleep_soft"``: BLEEP's soft-target CLIP loss at a fixed temperature on unnormalised
    embeddings. ``kind="contrastive"``: :class:`~he2st.methods.losses.ContrastiveLoss` (L2-normalised,
    learned temperature, soft or identity targets); when ``reference=(a_all, b_all, targets)`` is
    given, the batch is scored against every reference spot instead
    (:func:`~he2st.methods.losses.reference_contrastive_loss`, the improved BLEEP's ``negatives="all"``).
    """

    def __init__(
        self,
        kind: Literal["bleep_soft", "contrastive"] = "contrastive",
        temperature: float = 0.07,
        learn_temperature: bool = True,
        soft_targets: bool = True,
        target_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.fixed_temperature = temperature
        self.contrastive = None
        if kind == "contrastive":
            self.contrastive = ContrastiveLoss(
                init_temperature=temperature,
                learn_temperature=learn_temperature,
                soft_targets=soft_targets,
                target_temperature=target_temperature,
            )
        elif kind != "bleep_soft":
            raise He2stError(f"unknown alignment loss {kind!r}; use 'bleep_soft' or 'contrastive'")

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.contrastive is None:
            return bleep_soft_clip_loss(a, b, self.fixed_temperature)
        if reference is None:
            return self.contrastive(a, b)
        loss = self.contrastive
        with torch.no_grad():
            loss.log_temperature.clamp_(*loss.log_bounds)
        return reference_contrastive_loss(
            a, b, reference[0], reference[1], reference[2], loss.log_temperature.exp()
        )


def multi_positive_nce(
    anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """InfoNCE with several positives per anchor (SupCon form): cosine logits ``(B, M) / τ``;
    each anchor's loss is minus the mean log-probability of its positive candidates.
    ``positives`` ``(B, M)`` is boolean; every anchor needs at least one positive."""
    a = F.normalize(anchors, dim=-1)
    c = F.normalize(candidates, dim=-1)
    log_prob = F.log_softmax(a @ c.T / temperature, dim=1)
    pos = positives.to(log_prob.dtype)
    return -((log_prob * pos).sum(dim=1) / pos.sum(dim=1).clamp(min=1.0)).mean()


# ====================================================================== towers and retrieval
def expression_tower(
    kind: Literal["projection", "mlp"], n_genes: int, dim: int, hidden: Sequence[int], dropout: float
) -> nn.Module:
    """BLEEP's projection head (``projection``) or the improved BLEEP's MLP encoder (``mlp``)."""
    if kind == "mlp":
        return MLPEncoder(n_genes, hidden=tuple(hidden), out_dim=dim, dropout=dropout)
    return ProjectionHead(n_genes, dim, dropout)


class RetrievalConfig(MethodConfig):
    """Options shared by the contrastive retrieval methods (alignment loss, towers, retrieval)."""

    seed: int = Field(0, description="seed of initialisation, shuffling, masking and augmentation")
    projection_dim: int = Field(256, gt=0, description="joint embedding size (BLEEP/CMRCNet: 256)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside the projection heads and encoders")
    expression_encoder: Literal["projection", "mlp"] = Field(
        "mlp",
        description="expression tower: BLEEP's projection head ('projection') or an MLP encoder ('mlp')",
    )
    mlp_hidden: list[int] = Field(
        default_factory=lambda: [512], description="hidden widths of the MLP expression encoder"
    )
    loss: Literal["bleep_soft", "contrastive"] = Field(
        "contrastive",
        description="image-expression loss: 'bleep_soft' = BLEEP's soft CLIP loss at fixed τ on "
        "unnormalised embeddings (batch-size dependent); 'contrastive' = L2-normalised, learned τ",
    )
    temperature: float = Field(
        0.07, gt=0, description="τ of the alignment loss (BLEEP: 1.0); initial value when learned"
    )
    learn_temperature: bool = Field(True, description="learn τ (loss='contrastive' only)")
    soft_targets: bool = Field(
        True, description="BLEEP-style soft targets (else identity targets, i.e. InfoNCE)"
    )
    target_temperature: float = Field(0.1, gt=0, description="fixed temperature of the soft targets")
    negatives: Literal["batch", "all"] = Field(
        "all",
        description="'batch': in-batch negatives; 'all': every training spot re-embedded each step, soft "
        "targets from measured expression similarity (loss='contrastive' only; independent of batch size)",
    )
    k: int = Field(50, gt=0, description="reference spots retrieved per query")
    weighting: Literal["average", "softmax", "similarity"] = Field(
        "softmax", description="how retrieved profiles are combined (BLEEP/CMRCNet: 'average')"
    )
    weighting_temperature: float = Field(0.05, gt=0, description="temperature of weighting='softmax'")
    query_neighbours: int = Field(
        0, ge=0,
        description="he2st addition (NH2ST's neighbourhood idea at query time): average each query's image "
        "embedding with those of its k physically nearest spots predicted together (same slide); 0: off",
    )


class RetrievalMixin:
    """Prediction by retrieval, BLEEP's way: image embeddings of query spots are matched (cosine)
    against expression embeddings of reference spots held in ``self.bank``.

    The host class provides ``embed_images(SpotSet) -> np.ndarray``, ``self.net.expression_tower``
    (or its own ``embed_expression``) and ``config`` with ``projection_dim``, ``k``, ``weighting``,
    ``weighting_temperature`` and optionally ``query_neighbours`` (neighbour context of the queries).
    """

    bank: ReferenceBank | None

    @property
    def spatial_context_k(self) -> int:
        """Physically nearest spots each query reads (``query_neighbours``); chunked whole-slide
        prediction adds them to every chunk as a halo so spots at chunk borders keep their context."""
        return int(getattr(self.config, "query_neighbours", 0))

    @torch.no_grad()
    def embed_expression(self, expression: np.ndarray, batch: int = 1024) -> np.ndarray:
        """Expression embeddings (the reference side of retrieval); hosts keep their tower at ``self.net.expression_tower``."""
        self.net.eval()
        out = [
            self.net.expression_tower(torch.from_numpy(expression[a : a + batch].astype(np.float32)))
            for a in range(0, len(expression), batch)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.config.projection_dim), np.float32)

    def _all_negatives(self) -> bool:
        """Whether training contrasts each batch with every training spot (``negatives="all"``)."""
        return self.config.negatives == "all" and self.config.loss == "contrastive"

    @torch.no_grad()
    def _embed_frozen(self, head: nn.Module, spots: SpotSet, batch: int = 1024) -> torch.Tensor:
        """``head`` applied, in batches, to the spots' standardised frozen features (``self.scaler``)."""
        self.net.eval()
        x = self.scaler(spots.features)
        out = [head(torch.from_numpy(x[a : a + batch])) for a in range(0, len(x), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.config.projection_dim)

    def _reference_from_training(self, train: SpotSet, val: SpotSet | None) -> None:
        """The default bank: every training spot, validation spots included."""
        spots = train if val is None else SpotSet.concat([train, val])
        self.set_reference(spots.targets, spots.genes, list(spots.sample_ids))

    def set_reference(
        self,
        panel_expression: np.ndarray,
        genes: list[str],
        sample_ids: list[str],
        output_expression: np.ndarray | None = None,
        output_genes: list[str] | None = None,
    ) -> None:
        """Reference bank = expression embeddings of reference spots (training spots, and any
        expression-only sections whose patient is not under test); ``output_expression`` optionally
        returns more genes (e.g. the whole transcriptome) than the model was trained on."""
        embeddings = self.embed_expression(panel_expression)
        self.bank = ReferenceBank(
            embeddings,
            panel_expression if output_expression is None else output_expression,
            genes if output_genes is None else output_genes,
            sample_ids,
        )

    def _retrieve(self, spots: SpotSet) -> Prediction:
        if self.bank is None:
            raise He2stError(f"method {self.name} has no reference bank")
        cfg = self.config
        queries = self.embed_images(spots)
        if getattr(cfg, "query_neighbours", 0):
            queries = neighbour_context(queries, spots.coords_um, spots.sample_ids, cfg.query_neighbours)
        result = self.bank.predict(
            queries,
            k=min(cfg.k, len(self.bank)),
            weighting=cfg.weighting,
            temperature=cfg.weighting_temperature,
        )
        return Prediction(
            result.expression,
            result.genes,
            {"best_similarity": result.best_similarity, "dispersion": result.dispersion},
        )
