"""Test-time augmentation: average embeddings over flips and 90-degree rotations.

Histology has no canonical orientation, but most encoders are not rotation invariant, so
the same spot imaged rotated would get a different embedding. Averaging over the dihedral
group D4 (4 rotations x optional mirror) makes the embedding exactly invariant to those
transforms; ``flips`` is a cheaper 3-view compromise (identity, horizontal, vertical).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from he2st.errors import He2stError

TtaMode = Literal["none", "flips", "d4"]

_Transform = Callable[[torch.Tensor], torch.Tensor]
CHANNELS_FIRST = (-2, -1)  # (B, C, H, W) tensors
CHANNELS_LAST = (1, 2)  # (B, H, W, C) uint8 patches


def _flip(dim: int) -> _Transform:
    return lambda x: torch.flip(x, dims=(dim,))


def _rotation(quarter_turns: int, mirrored: bool, dims: tuple[int, int]) -> _Transform:
    def apply(x: torch.Tensor) -> torch.Tensor:
        x = torch.flip(x, dims=(dims[1],)) if mirrored else x
        return torch.rot90(x, k=quarter_turns, dims=dims) if quarter_turns else x

    return apply


def views(mode: str, dims: tuple[int, int] = CHANNELS_FIRST) -> tuple[_Transform, ...]:
    """The transforms of ``mode`` over the spatial ``dims`` (height, width), identity first."""
    if mode == "none":
        return (lambda x: x,)
    if mode == "flips":
        return (lambda x: x, _flip(dims[1]), _flip(dims[0]))
    if mode == "d4":
        return tuple(_rotation(k, mirrored, dims) for mirrored in (False, True) for k in range(4))
    raise He2stError(f"unknown test-time augmentation '{mode}': choose none, flips or d4")


def embed_with_tta(
    encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: TtaMode = "none",
    dims: tuple[int, int] = CHANNELS_FIRST,
) -> torch.Tensor:
    """Mean of ``encoder`` over the augmented views of ``x`` (spatial ``dims``; square for d4).

    Views are encoded one at a time, so memory stays that of a single batch. Normalisation is
    per pixel, so augmenting raw patches (``CHANNELS_LAST``) equals augmenting normalised input.
    """
    transforms = views(mode, dims)
    if mode == "d4" and x.shape[dims[0]] != x.shape[dims[1]]:
        raise He2stError(f"d4 test-time augmentation needs square inputs, got {(x.shape[dims[0]], x.shape[dims[1]])}")
    total = encoder(transforms[0](x))
    for transform in transforms[1:]:
        total = total + encoder(transform(x))
    return total / len(transforms)
