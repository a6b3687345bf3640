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
    "MCFNCrossAttention",
    "MLPEncoder",
    "OneWayFusionBlock",
    "ProjectionHead",
    "SharedFusion",
    "TokenwiseLinear",
    "expression_tower",
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

    def forward(
        self, a: torch.Tensor, b: torch.Tensor,
        a_valid: torch.Tensor | None = None, b_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse ``(B, La, dim)`` and ``(B, Lb, dim)``; returns tensors of the same shapes. ``a_valid`` /
        ``b_valid`` ``(B, L)`` (True = real token) keep padded neighbours from being attended to."""
        a_pad, b_pad = _padding(a_valid), _padding(b_valid)
        for block_a, block_b in zip(self.a_from_b, self.b_from_a, strict=True):
            a, b = block_a(a, b, b_pad), block_b(b, a, a_pad)
        return self.norm_a(a), self.norm_b(b)


class SharedFusion(nn.Module):
    """NH2ST's ``TWOFusionEncoder`` used both ways: one stack of cross-attention blocks and one final
    LayerNorm serve both directions, applied one after the other -- the first stream reads the second,
    then the second reads the *updated* first (NH2ST: image <- expression, then expression <- image).
    NH2ST shares one such encoder between the target spot and the neighbourhood as well."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def _read(
        self, queries: torch.Tensor, context: torch.Tensor, padding: torch.Tensor | None
    ) -> torch.Tensor:
        for block in self.blocks:
            queries = block(queries, context, padding)
        return self.norm(queries)

    def forward(
        self, a: torch.Tensor, b: torch.Tensor,
        a_valid: torch.Tensor | None = None, b_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` reads ``b``, then ``b`` reads the new ``a``; shapes and padding as
        :class:`BidirectionalFusion`."""
        a = self._read(a, b, _padding(b_valid))
        return a, self._read(b, a, _padding(a_valid))


def _padding(valid: torch.Tensor | None) -> torch.Tensor | None:
    """Key-padding mask (True = ignore) from a validity mask (True = real token)."""
    return None if valid is None else ~valid


class MCFNCrossAttention(nn.Module):
    """The cross-attention of CMRCNet's fusion block (from MCFN): queries and keys each pass
    ``Linear -> ReLU -> Dropout``; per head the output is ``V1 q + softmax(q k^T / sqrt(d_head)) V2 k``
    -- the transformed queries plus what they read -- with no output projection or normalisation."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.heads = heads
        self.queries = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.keys = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.query_values = nn.Linear(dim, dim)
        self.key_values = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, Lq, dim)`` reads ``context`` ``(B, Lk, dim)`` -> ``(B, Lq, dim)``."""
        q, k = self.queries(x), self.keys(context)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        qh, kh = heads(q), heads(k)
        attention = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)
        read = (attention @ heads(self.key_values(k))).transpose(1, 2).reshape(q.shape)
        return self.query_values(q) + read


class OneWayFusionBlock(nn.Module):
    """CMRCNet's fusion block (``Block_fusion_MCFN_2``): the image stream runs a pre-norm ViT block
    (self-attention, then MLP) and adds what it reads from the expression tokens through
    :class:`MCFNCrossAttention`; the expression tokens are not updated (one-way). CMRCNet applies one
    such block twice with shared weights."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4, dropout: float = 0.1,
                 cross_dropout: float = 0.25) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.attention_dropout = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, dim), nn.Dropout(dropout),
        )
        self.cross = MCFNCrossAttention(dim, heads, cross_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Update the image tokens ``x`` ``(B, L, dim)``; ``context`` (expression tokens) is only read."""
        h = self.norm_attention(x)
        x = x + self.attention_dropout(self.attention(h, h, h, need_weights=False)[0])
        x = x + self.mlp(self.norm_mlp(x))
        return x + self.cross(x, context)


class TokenwiseLinear(nn.Module):
    """A separate linear map per token position: ``(B, T, C) -> (B, T, out_dim)``.

    For tokens that are consecutive chunks of one feature vector, where channel ``j`` of one chunk
    means something else than channel ``j`` of the next: a shared ``nn.Linear`` would mix unrelated
    features, so the chunks would say little about the image (the reconstruction then leans on
    expression alone). Initialised as ``nn.Linear``.
    """

    def __init__(self, n_tokens: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1 / in_dim**0.5
        self.weight = nn.Parameter(torch.empty(n_tokens, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_tokens, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btc,tcd->btd", x, self.weight) + self.bias


class ExpressionTokenizer(nn.Module):
    """Expression vector -> ``T`` tokens ``(..., T, dim)``.

    With a ``hidden`` width (he2st): ``Linear -> SELU -> AlphaDropout -> Linear`` (GELU and plain
    dropout with ``self_normalising=False``). With ``hidden=None``: CMRCNet's ``SNN_Block`` as published,
    one ``Linear -> ELU -> AlphaDropout`` straight to ``T * dim``.
    """

    def __init__(
        self,
        n_genes: int,
        n_tokens: int,
        dim: int,
        hidden: int | None = 1024,
        dropout: float = 0.1,
        self_normalising: bool = True,
    ) -> None:
        super().__init__()
        self.n_tokens, self.dim = n_tokens, dim
        if hidden is None:
            self.net = nn.Sequential(nn.Linear(n_genes, n_tokens * dim), nn.ELU(), nn.AlphaDropout(dropout))
            return
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
