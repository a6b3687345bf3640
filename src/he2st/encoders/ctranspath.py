"""The convolutional patch stem of CTransPath (Wang et al., 2022).

CTransPath replaces Swin-T's 4x4 patchify convolution with two stride-2 3x3 conv-BN-ReLU
layers and a 1x1 projection. timm has no such Swin variant, but its Swin accepts a custom
``embed_layer``; this module is that layer, with parameter names matching the published
checkpoint (``patch_embed.proj.{0,1,3,4,6}``, ``patch_embed.norm``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvStem(nn.Module):
    """Two stride-2 convolutions (4x downsampling) then a 1x1 projection, output NHWC.

    The signature follows timm's ``PatchEmbed`` so ``SwinTransformer`` can build it; timm's
    Swin works on NHWC maps, so the output is channels-last.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Callable[[int], nn.Module] | None = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch != (4, 4) or output_fmt != "NHWC":
            raise ValueError("ConvStem only implements CTransPath's 4x4 stem with NHWC output")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        channels_in, channels_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False, **factory),
                nn.BatchNorm2d(channels_out, **factory),
                nn.ReLU(inplace=True),
            ]
            channels_in, channels_out = channels_out, channels_out * 2
        layers.append(nn.Conv2d(channels_in, embed_dim, 1, **factory))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()
        self.img_size = size
        self.patch_size = patch
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.strict_img_size = strict_img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} px, the model expects {self.img_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))
