"""Test-time augmentation: average embeddings over flips and 90-degree rotations.

Histology has no canonical orientation, but most encoders are not rotation invariant, so
the same spot imaged rotated would get a different embedding. Averaging over the dihedral
group D4 (4 rotations x optional mirror) makes the embedding exactly invariant to those
transforms; ``flips`` is a cheaper 3-view compromise (identity, horizontal, vertical).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal

import torch

from he2st.errors import He2stError

TtaMode = Literal["none", "flips", "d4"]

_Transform = Callable[[torch.Tensor], torch.Tensor]
_H, _W = -2, -1


def _rotation(quarter_turns: int, mirrored: bool) -> _Transform:
    def apply(x: torch.Tensor) -> torch.Tensor:
        x = torch.flip(x, dims=(_W,)) if mirrored else x
        return torch.rot90(x, k=quarter_turns, dims=(_H, _W)) if quarter_turns else x

    return apply


_TRANSFORMS: Mapping[str, tuple[_Transform, ...]] = MappingProxyType(
    {
        "none": (lambda x: x,),
        "flips": (lambda x: x, lambda x: torch.flip(x, dims=(_W,)), lambda x: torch.flip(x, dims=(_H,))),
        "d4": tuple(_rotation(k, mirrored) for mirrored in (False, True) for k in range(4)),
    }
)


def embed_with_tta(
    encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: TtaMode = "none"
) -> torch.Tensor:
    """Mean of ``encoder`` over the augmented views of ``x`` (``(B, C, H, W)``, square for d4).

    Views are encoded one at a time, so memory stays that of a single batch.
    """
    transforms = _transforms(mode)
    if mode == "d4" and x.shape[_H] != x.shape[_W]:
        raise He2stError(f"d4 test-time augmentation needs square inputs, got {tuple(x.shape[-2:])}")
    total = encoder(transforms[0](x))
    for transform in transforms[1:]:
        total = total + encoder(transform(x))
    return total / len(transforms)


def _transforms(mode: str) -> tuple[_Transform, ...]:
    if mode not in _TRANSFORMS:
        raise He2stError(f"unknown test-time augmentation '{mode}': choose none, flips or d4")
    return _TRANSFORMS[mode]
