"""Training-time augmentation for H&E patches: dihedral flips/rotations and mild colour jitter.

H&E has no canonical orientation, so the 8 dihedral transforms are label-preserving; staining
varies between labs, so small brightness/contrast/saturation/hue changes make the encoder less
sensitive to it. Applied per sample on uint8 batches (B, H, W, 3) before the encoder's preprocessing.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF


def augment_batch(
    patches: torch.Tensor, generator: torch.Generator, jitter: float = 0.1, hue: float = 0.02
) -> torch.Tensor:
    """Random dihedral transform + colour jitter per patch; returns uint8 (B, H, W, 3)."""
    out = []
    for patch in patches.permute(0, 3, 1, 2):  # (3, H, W) uint8
        k = int(torch.randint(4, (1,), generator=generator))
        patch = torch.rot90(patch, k, dims=(1, 2))
        if torch.rand(1, generator=generator) < 0.5:
            patch = patch.flip(2)
        if jitter > 0:
            factors = 1 + (torch.rand(3, generator=generator) * 2 - 1) * jitter
            patch = TF.adjust_brightness(patch, float(factors[0]))
            patch = TF.adjust_contrast(patch, float(factors[1]))
            patch = TF.adjust_saturation(patch, float(factors[2]))
            if hue > 0:
                patch = TF.adjust_hue(patch, float((torch.rand(1, generator=generator) * 2 - 1) * hue))
        out.append(patch)
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()
