"""The encoder module every he2st method uses: uint8 patches in, embeddings or tokens out.

Methods must not care which backbone they get, so the encoder owns its preprocessing
(resize + normalisation from its spec) and its pooling (class token, mean of patch tokens,
Virchow-style concatenation, CONCH's attentional pooler). Masked-reconstruction methods
need the spatial token map rather than the pooled vector, hence :meth:`Encoder.forward_tokens`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from he2st.encoders.spec import EncoderSpec
from he2st.errors import He2stError


class Encoder(nn.Module):
    """A backbone plus the preprocessing and pooling recorded in :attr:`spec`.

    ``create`` returns it frozen and in eval mode because extracting embeddings is the
    common case; call :meth:`set_trainable` (and ``.train()``) to fine-tune it.
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        # Not persistent: the spec is the record of the normalisation, and keeping these out
        # of state_dict() lets an encoder's saved weights load back as a plain backbone.
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        """Length of the pooled embedding returned by :meth:`forward`."""
        return self.spec.embed_dim

    def preprocess(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 RGB patches ``(B, H, W, 3)`` -> normalised float ``(B, 3, S, S)`` on the encoder's device.

        Patches that are not ``S x S`` (``S = spec.input_size``) are resized with the spec's
        interpolation (antialiased, so downscaling large patches does not alias); pass
        square patches, as the aspect ratio is not preserved.
        """
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        if (
            not isinstance(batch, torch.Tensor)
            or batch.dtype != torch.uint8
            or batch.ndim != 4
            or batch.shape[-1] != 3
        ):
            got = (
                f"{batch.dtype} {tuple(batch.shape)}"
                if isinstance(batch, torch.Tensor)
                else type(batch).__name__
            )
            raise He2stError(
                f"encoder '{self.spec.name}' expects uint8 RGB patches shaped (B, H, W, 3), got {got}"
            )
        x = batch.to(self.pixel_mean.device).permute(0, 3, 1, 2).to(self.pixel_mean.dtype).div_(255.0)
        size = self.spec.input_size
        if tuple(x.shape[-2:]) != (size, size):
            x = _resize(x, size, self.spec.interpolation)
        return (x - self.pixel_mean) / self.pixel_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's raw last-layer output (token sequence or feature map)."""
        return self.backbone.forward_features(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial tokens ``(B, N, C)``: ViT patch tokens (no class/register tokens) or a flat CNN map."""
        return spatial_tokens(self.forward_features(x), self.backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, S, S)`` -> embeddings ``(B, embed_dim)``."""
        return self.pool(self.forward_features(x))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The spec's pooling of :meth:`forward_features` output -> ``(B, embed_dim)``."""
        pooling = self.spec.pooling
        if pooling == "attentional":
            return self.backbone.attentional_pool(features)
        if pooling == "head":
            return self.backbone.forward_head(features, pre_logits=True)
        head_norm = getattr(self.backbone, "fc_norm", nn.Identity())
        if pooling == "avg":
            return head_norm(spatial_tokens(features, self.backbone).mean(dim=1))
        if pooling == "cls":
            return head_norm(features[:, 0])
        patch_mean = head_norm(spatial_tokens(features, self.backbone).mean(dim=1))
        return torch.cat([head_norm(features[:, 0]), patch_mean], dim=-1)

    def grid_tokens(self, features: torch.Tensor, grid: int) -> torch.Tensor:
        """Spatial tokens of :meth:`forward_features` output average-pooled to a ``grid x grid`` map,
        ``(B, grid², C)`` row-major -- small enough to cache per spot for token-level methods."""
        return pool_to_grid(spatial_tokens(features, self.backbone), grid, self.spec.name)

    def set_trainable(self, trainable: bool) -> Encoder:
        """Enable or disable gradients for all backbone parameters (fine-tuning); returns self."""
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(trainable)
        return self


def spatial_tokens(features: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """Spatial tokens ``(B, N, C)`` of a backbone's ``forward_features`` output: a sequence without
    its prefix (class/register) tokens, or a feature map flattened to tokens."""
    if features.ndim == 3:
        return features[:, getattr(backbone, "num_prefix_tokens", 0) :]
    if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
        return features.flatten(1, 2)
    return features.flatten(2).transpose(1, 2)


def pool_to_grid(tokens: torch.Tensor, grid: int, encoder_name: str) -> torch.Tensor:
    """Square-map spatial tokens ``(B, N, C)`` average-pooled to ``(B, grid², C)``, row-major."""
    batch, n, channels = tokens.shape
    side = round(n**0.5)
    if side * side != n:
        raise He2stError(f"encoder '{encoder_name}' gives {n} spatial tokens, not a square map")
    grid_map = tokens.transpose(1, 2).reshape(batch, channels, side, side)
    return F.adaptive_avg_pool2d(grid_map, grid).flatten(2).transpose(1, 2)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    # Bicubic overshoots; clamp back to the valid pixel range like PIL does.
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True).clamp_(
        0.0, 1.0
    )
