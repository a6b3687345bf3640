"""Running an encoder on patches: device, precision, stain normalisation and TTA in one place.

Every path that turns tissue into features -- the patch caches of ``he2st embed`` and whole-slide
prediction -- goes through :func:`ready_for_inference` and :func:`embed_patches`, so a slide is
encoded exactly the way the training features were.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from he2st.data.embeddings import EmbedConfig
from he2st.encoders.encoder import Encoder
from he2st.encoders.registry import create
from he2st.encoders.stain import make_stain_normalizer
from he2st.encoders.tta import embed_with_tta


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on GPUs by default (pathology FMs are trained/used in half precision), fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}[precision]


def ready_for_inference(
    encoder: Encoder, config: EmbedConfig
) -> tuple[torch.device, torch.dtype | None, Callable[[np.ndarray], np.ndarray] | None]:
    """Move ``encoder`` to the configured device in eval mode (channels-last on GPUs); returns that
    device, the autocast dtype and the stain normaliser (None: off), so every embedding path -- the
    patch cache and whole-slide prediction -- encodes tissue identically."""
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    encoder.to(device).eval()
    if device.type != "cpu":
        encoder.to(memory_format=torch.channels_last)
    stain = make_stain_normalizer(config.stain)[0] if config.stain != "none" else None
    return device, dtype, stain


def embed_patches(
    encoder: Encoder, patches: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None,
    stain: Callable[[np.ndarray], np.ndarray] | None = None, tta: str = "none", token_grid: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Embed a batch of uint8 patches (B, H, W, 3) -> float32 (B, D), and with ``token_grid`` > 0 the
    token grid (B, g², C) from the same forward pass (a second pass of the plain view under TTA)."""
    if stain is not None:
        patches = stain(np.asarray(patches))
    x = encoder.preprocess(patches).to(device).contiguous(memory_format=torch.channels_last)
    tokens = None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if tta != "none":
            out = embed_with_tta(encoder, x, tta)
            if token_grid:
                tokens = encoder.grid_tokens(encoder.forward_features(x), token_grid)
        else:
            features = encoder.forward_features(x)
            out = encoder.pool(features)
            if token_grid:
                tokens = encoder.grid_tokens(features, token_grid)
    return out.float().cpu().numpy(), None if tokens is None else tokens.float().cpu().numpy()


def load_encoder(config: EmbedConfig) -> Encoder:
    return create(config.encoder, weights=config.weights)
