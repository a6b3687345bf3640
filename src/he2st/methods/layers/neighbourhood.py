"""Spatial neighbourhoods and the layers that read them (NH2ST's branch, CarHE's positives, query context).

Neighbourhoods come from physical spot distance and never cross samples
(:func:`spatial_neighbours`); a neighbourhood's nodes pass a k-NN hypergraph
(:class:`NeighbourhoodHypergraph`, NH2ST) or self-attention (:class:`NeighbourhoodAttention`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from he2st.errors import He2stError
from he2st.methods.layers.nn import CrossAttentionBlock

#: distances within this relative tolerance are ties (a lattice's equidistant spots differ in their last bits)
TIE_TOLERANCE = 1e-9
#: points looked at beyond the k-th nearest, to see its ties: on a square or hexagonal lattice a spot's nearer
#: shells of equidistant spots hold at most 12
TIE_WINDOW = 12


def spatial_neighbours(
    coords_um: np.ndarray, sample_ids: Sequence, k: int, max_distance_um: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` physically nearest other spots of every spot, within its own sample only.

    ``coords_um`` ``(N, 2)`` are spot centres in micrometres, ``sample_ids`` ``(N,)`` the sample of
    each spot. Returns ``index`` ``(N, k)`` (row numbers into the same arrays, nearest first) and
    ``valid`` ``(N, k)``. A slot is invalid when the sample has fewer than ``k + 1`` spots or the
    neighbour is farther than ``max_distance_um``; invalid slots hold the spot's own row (safe to
    gather) and must be masked. The spot itself is never its own neighbour, and spots of another
    sample never are. Equidistant spots (a lattice's) are ordered by their coordinates, so which of
    them is a neighbour depends on the spots alone, not on the order of the rows or on which other
    spots are in the set: a slide predicted in chunks reads the neighbours it reads whole.
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
        kk = min(k, m - 1)
        nb, dist = _nearest_others(coords[rows], kk)
        ok = np.isfinite(dist)
        if max_distance_um is not None:
            ok &= dist <= max_distance_um
        index[rows, :kk] = np.where(ok, rows[nb], rows[:, None])
        valid[rows, :kk] = ok
    return index, valid


def _nearest_others(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, distances)`` ``(m, k)`` of each point's ``k`` nearest other points (``k < m``), nearest first,
    ties (within :data:`TIE_TOLERANCE`) ordered by x, then y, then row. The k-d tree is asked for
    :data:`TIE_WINDOW` points beyond the k-th, so that a tie across the k-th is seen and resolved within them;
    a point whose tie runs past them is completed by a radius search."""
    m = len(points)
    tree = cKDTree(points)
    width = min(k + 1 + TIE_WINDOW, m)
    dist, nb = tree.query(points, k=width)
    dist, nb = dist.reshape(m, width), nb.reshape(m, width)
    is_self = nb == np.arange(m)[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # duplicated coordinates: self may fall outside the window
    keep = ~is_self
    nb, dist = nb[keep].reshape(m, width - 1), dist[keep].reshape(m, width - 1)
    kth = dist[:, k - 1 : k]
    beyond = dist > kth + TIE_TOLERANCE * kth  # farther than the k-th: sorted after every tie of it
    order = _tie_order(points, nb, dist, beyond)
    nb, dist = np.take_along_axis(nb, order, 1)[:, :k], np.take_along_axis(dist, order, 1)[:, :k]
    spill = np.flatnonzero(~beyond[:, -1]) if width < m else np.zeros(0, np.int64)
    for i in spill:  # the k-th's tie runs past the window: every point at that distance, then ordered
        others = np.array([j for j in tree.query_ball_point(points[i], kth[i, 0] * (1 + 2 * TIE_TOLERANCE))
                           if j != i], dtype=np.int64)
        d = np.linalg.norm(points[others] - points[i], axis=1)
        by_distance = np.argsort(d, kind="stable")
        others, d = others[by_distance], d[by_distance]
        pick = _tie_order(points, others, d)[:k]
        nb[i], dist[i] = others[pick], d[pick]
    return nb, dist


def _tie_order(points: np.ndarray, nb: np.ndarray, dist: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    """The order (along the last axis) of candidate rows ``nb`` of ``points`` at distances ``dist`` (ascending
    there): nearest first, ties by x, then y, then row; ``first``: a key that comes before all of these."""
    keys = (nb, points[nb, 1], points[nb, 0], _tie_groups(dist))
    return np.lexsort(keys if first is None else (*keys, first), axis=-1)


def _tie_groups(dist: np.ndarray) -> np.ndarray:
    """Rank of each distance's tie group along the last axis (``dist`` sorted ascending there): distances
    within :data:`TIE_TOLERANCE` of the previous one share its group."""
    step = np.diff(dist, axis=-1) > TIE_TOLERANCE * dist[..., 1:]
    first = np.zeros(dist.shape[:-1] + (1,), dtype=np.int64)
    return np.concatenate([first, np.cumsum(step, axis=-1)], axis=-1)


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
    total, count = neighbour_sum(z, coords_um, sample_ids, k, max_distance_um)
    return ((z + total) / (1 + count)).astype(np.float32)


def neighbour_sum(
    features: np.ndarray, coords_um: np.ndarray, sample_ids: Sequence, k: int, max_distance_um: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the features of each spot's ``k`` physically nearest spots of its sample (float64), and
    how many there were ``(N, 1)``; added slot by slot, never as an ``(N, k, D)`` array."""
    index, valid = spatial_neighbours(coords_um, sample_ids, k, max_distance_um)
    total = np.zeros(features.shape, dtype=np.float64)
    for j in range(k):
        total += features[index[:, j]] * valid[:, j, None]
    return total, valid.sum(axis=1, keepdims=True)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``(B, n, d)`` over the nodes where ``valid`` ``(B, n)`` is True."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class NeighbourhoodAttention(nn.Module):
    """Self-attention over a spot and its neighbours: ``(B, n, dim)`` nodes -> ``(B, n, dim)``.

    Pre-norm transformer blocks (:class:`~he2st.methods.layers.nn.CrossAttentionBlock` with the node set
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
    and its ``k - 1`` most cosine-similar valid nodes (NH2ST: ``k = 4``, a node and its 3 most
    similar). Returns the incidence ``(B, nodes, edges)``."""
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
    """NH2ST's neighbour branch: a k-NN hypergraph over the neighbourhood's nodes and ``depth``
    hypergraph convolutions ``in_dim -> hidden -> ... -> dim``. ``(B, n, in_dim)`` -> ``(B, n, dim)``;
    padded nodes come out as zeros.

    The hypergraph is built from the input nodes unless ``incidence`` is given (NH2ST builds it on the
    image nodes and reuses it for the expression nodes). ``relu_every_layer=False`` (he2st): GELU and
    dropout between convolutions; ``True``: ReLU after every convolution, the last included, and no
    dropout (NH2ST's ``HGNN``/``EXPNN``).
    """

    def __init__(
        self, dim: int, hidden: int | None = None, depth: int = 2, hyperedge_k: int = 3, dropout: float = 0.1,
        in_dim: int | None = None, relu_every_layer: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        hidden = hidden or 2 * dim
        widths = [in_dim or dim] + [hidden] * (depth - 1) + [dim]
        self.convs = nn.ModuleList(HypergraphConv(a, b) for a, b in itertools.pairwise(widths))
        self.act = nn.ReLU() if relu_every_layer else nn.GELU()
        self.dropout = nn.Identity() if relu_every_layer else nn.Dropout(dropout)
        self.relu_every_layer = relu_every_layer
        self.hyperedge_k = hyperedge_k

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, incidence: torch.Tensor | None = None
    ) -> torch.Tensor:
        if incidence is None:
            incidence = knn_hypergraph(x, valid, self.hyperedge_k)
        keep = valid.unsqueeze(-1).to(x.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x, incidence)
            if self.relu_every_layer or i < len(self.convs) - 1:
                x = self.dropout(self.act(x))
        return x * keep


def neighbourhood_layer(
    kind: Literal["hypergraph", "attention"],
    dim: int,
    heads: int = 4,
    depth: int = 2,
    hyperedge_k: int = 3,
    dropout: float = 0.1,
    in_dim: int | None = None,
    relu_every_layer: bool = False,
) -> nn.Module:
    """The neighbour-branch layer chosen by a method's config (``in_dim`` and ``relu_every_layer``:
    hypergraph only, see :class:`NeighbourhoodHypergraph`)."""
    if kind == "hypergraph":
        return NeighbourhoodHypergraph(dim, 2 * dim, depth, hyperedge_k, dropout, in_dim, relu_every_layer)
    if kind == "attention":
        return NeighbourhoodAttention(dim, heads, depth, mlp_ratio=2, dropout=dropout)
    raise He2stError(f"unknown neighbourhood layer {kind!r}; use 'hypergraph' or 'attention'")
