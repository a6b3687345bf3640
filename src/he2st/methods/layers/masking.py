"""Masking and views of frozen features: CMRCNet's masked tokens, feature chunks as stand-in tokens,
and feature-space augmentation (the stand-in for image augmentation when the encoder is frozen)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from he2st.errors import He2stError


def random_mask(
    shape: tuple[int, int, int],
    ratio: float,
    mode: Literal["element", "token", "bernoulli"] = "element",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask ``(B, T, C)``, True = masked, with *exactly* ``round(ratio · n)`` masked entries
    per sample: ``n = T · C`` single elements (``element``) or ``n = T`` whole tokens (``token``,
    MAE-style), positions drawn uniformly without replacement; or each element masked independently
    with probability ``ratio`` (``bernoulli``, CMRCNet's code: ``rand < 0.5`` keeps an entry)."""
    if not 0.0 <= ratio < 1.0:
        raise He2stError(f"mask ratio must be in [0, 1), got {ratio}")
    if mode not in ("element", "token", "bernoulli"):
        raise He2stError(f"unknown mask mode {mode!r}; use 'element', 'token' or 'bernoulli'")
    batch, tokens, channels = shape
    if mode == "bernoulli":
        return torch.rand(shape, generator=generator) < ratio
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
