"""Neural building blocks shared by the contrastive methods (BLEEP and successors).

Every method maps an image feature and an expression profile into one joint embedding
space; the pieces that do that mapping live here so that the methods differ only where the
papers differ (losses, fusion, inference), not in re-implemented layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = [
    "BidirectionalFusion",
    "CrossAttentionBlock",
    "ExpressionTokenizer",
    "MLPEncoder",
    "ProjectionHead",
    "expression_tower",
    "fuse",
]


class ProjectionHead(nn.Module):
    """BLEEP's projection head: a residual two-layer MLP followed by LayerNorm.

    ``projected = W1 x``; ``h = dropout(W2 gelu(projected)) + projected``; ``LayerNorm(h)``.
    The residual keeps the linear projection as the dominant path early in training (so the
    joint space starts as a plain linear map of the features) while the non-linear branch
    learns corrections. Attribute names match BLEEP's so its checkpoints load unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., in_dim)`` features to ``(..., out_dim)`` embeddings."""
        projected = self.projection(x)
        h = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(h + projected)


class MLPEncoder(nn.Module):
    """Expression encoder for improved BLEEP: ``Linear→GELU→Dropout`` blocks, then a ProjectionHead.

    Faithful BLEEP projects the raw expression vector with a single ProjectionHead, i.e. an
    almost linear map; hidden blocks let the expression side model gene interactions before
    it is compared with the (much deeper) image side. ``hidden=()`` reduces to BLEEP.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (512,),
        out_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        self.blocks = nn.Sequential(*layers)
        self.head = ProjectionHead(width, out_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., in_dim)`` expression to ``(..., out_dim)`` embeddings."""
        return self.head(self.blocks(x))


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block whose attention reads keys/values from another modality.

    ``q = q + Attn(LN(q), LN(kv), LN(kv))``; ``q = q + MLP(LN(q))``. Pre-norm keeps the
    residual stream unnormalised, which trains stably without warm-up at the small batch
    sizes typical of spot data. Inputs are ``(B, Lq, dim)`` queries and ``(B, Lk, dim)``
    context; the output has the shape of the queries.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(
        self, queries: torch.Tensor, context: torch.Tensor, context_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update ``queries`` with information from ``context``.

        ``context_padding_mask`` is ``(B, Lk)`` with ``True`` at padded context tokens (e.g. missing
        neighbour spots at the tissue edge), which then receive no attention.
        """
        kv = self.norm_kv(context)
        attended, _ = self.attn(
            self.norm_q(queries), kv, kv, key_padding_mask=context_padding_mask, need_weights=False
        )
        x = queries + attended
        return x + self.mlp(self.norm_mlp(x))


class BidirectionalFusion(nn.Module):
    """Two streams (e.g. image and expression tokens) that cross-attend to each other per layer.

    In each layer both streams are updated from the *previous* layer's other stream, so the
    result does not depend on which modality is called first. A final LayerNorm per stream
    normalises the pre-norm residual streams before they are projected or compared.
    """

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 4, dropout: float = 0.0) -> None:
        super().__init__()
        def blocks() -> nn.ModuleList:
            return nn.ModuleList(CrossAttentionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))

        self.a_from_b = blocks()
        self.b_from_a = blocks()
        self.norm_a = nn.LayerNorm(dim)
        self.norm_b = nn.LayerNorm(dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse ``(B, La, dim)`` and ``(B, Lb, dim)``; returns tensors of the same shapes."""
        for block_a, block_b in zip(self.a_from_b, self.b_from_a, strict=True):
            a, b = block_a(a, b), block_b(b, a)
        return self.norm_a(a), self.norm_b(b)


def fuse(
    fusion: BidirectionalFusion,
    a: torch.Tensor,
    b: torch.Tensor,
    a_valid: torch.Tensor | None = None,
    b_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a :class:`BidirectionalFusion` with padding masks on both streams
    (``True`` = real token), so padded neighbours are never attended to."""
    a_pad = None if a_valid is None else ~a_valid
    b_pad = None if b_valid is None else ~b_valid
    for block_a, block_b in zip(fusion.a_from_b, fusion.b_from_a, strict=True):
        a, b = block_a(a, b, b_pad), block_b(b, a, a_pad)
    return fusion.norm_a(a), fusion.norm_b(b)


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


def expression_tower(
    kind: Literal["projection", "mlp"], n_genes: int, dim: int, hidden: Sequence[int], dropout: float
) -> nn.Module:
    """BLEEP's projection head (``projection``) or the improved BLEEP's MLP encoder (``mlp``)."""
    if kind == "mlp":
        return MLPEncoder(n_genes, hidden=tuple(hidden), out_dim=dim, dropout=dropout)
    return ProjectionHead(n_genes, dim, dropout)
