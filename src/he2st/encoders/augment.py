"""Training-time augmentation for H&E patches: dihedral flips/rotations, colour and stain jitter, crops.

H&E has no canonical orientation, so the 8 dihedral transforms are label-preserving; staining
varies between labs, so small brightness/contrast/saturation/hue changes, and changes of the amount
of haematoxylin and eosin (:func:`hed_jitter`), make the encoder less sensitive to it. Applied per
sample on uint8 batches (B, H, W, 3) before the encoder's preprocessing.
"""

from __future__ import annotations

import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms.v2 import functional as TF

_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)


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


def hed_jitter(patches: torch.Tensor, generator: torch.Generator, sigma: float = 0.05) -> torch.Tensor:
    """Per patch, scale each stain's optical density by ``1 ± sigma`` and shift it by ``± sigma`` in
    haematoxylin-eosin-DAB space (Ruifrok's vectors; Tellez et al. 2018's HED augmentation): the variation
    of staining strength between slides, which RGB colour jitter only approximates. uint8 (B, H, W, 3) in
    and out."""
    rgb = patches.to(torch.float32)
    od = -torch.log((rgb + 1.0) / 256.0)  # white -> 0; +1 keeps black finite
    stains = od @ _HED_FROM_RGB
    n = len(patches)
    scale = 1 + (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * sigma
    shift = (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * sigma
    od = (stains * scale + shift) @ _RGB_FROM_HED
    return (256.0 * torch.exp(-od) - 1.0).round_().clamp_(0, 255).to(torch.uint8)


def random_crop(patches: torch.Tensor, generator: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """Per patch, a random square crop of ``min_scale``-1 of its area resized back to the patch's size
    (antialiased): the same tissue at slightly different magnifications and framings. uint8 (B, H, W, 3)."""
    side = patches.shape[1]
    out = []
    for patch in patches.permute(0, 3, 1, 2):
        area = min_scale + (1 - min_scale) * float(torch.rand(1, generator=generator))
        crop = max(1, round(side * area**0.5))
        top, left = (int(v) for v in torch.randint(side - crop + 1, (2,), generator=generator))
        out.append(TF.resized_crop(patch, top, left, crop, crop, [side, side], antialias=True))
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()
