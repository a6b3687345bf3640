"""CONCH (Lu et al., 2024) as an he2st backbone.

CONCH is a CoCa vision-language model distributed with its own package; its image
embedding comes from an attentional pooler on top of a timm ViT-B/16 trunk. Only the visual
tower is kept (the text tower is not needed for embeddings). The package cannot be a
dependency of he2st (it is installed from GitHub), so it is imported on demand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from he2st.encoders.spec import EncoderSpec
from he2st.errors import He2stError

INSTALL_HINT = "pip install git+https://github.com/mahmoodlab/CONCH"


class ConchVisual(nn.Module):
    """CONCH's visual tower exposing timm-style ``forward_features`` and its attentional pooler."""

    num_prefix_tokens = 1  # the trunk is a timm ViT with one class token

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.trunk.forward_features(x)

    def attentional_pool(self, features: torch.Tensor) -> torch.Tensor:
        """The 512-d embedding CONCH returns for ``encode_image(proj_contrast=False, normalize=False)``."""
        return self.visual.ln_contrast(self.visual.attn_pool_contrast(features)[:, 0])


def require_conch(spec: EncoderSpec) -> None:
    """Fail early, before any download, when the CONCH package is missing."""
    try:
        import conch.open_clip_custom  # noqa: F401
    except ImportError as exc:
        raise He2stError(
            f"{spec.name} needs the CONCH package: {INSTALL_HINT}, then provide local weights "
            f"(--weights /path/to/{spec.weights_file or 'pytorch_model.bin'} from {spec.weights_page})"
        ) from exc


def build_conch(spec: EncoderSpec, checkpoint: Path) -> ConchVisual:
    """Build CONCH from its package and load ``checkpoint`` (CONCH's own loader)."""
    require_conch(spec)
    from conch.open_clip_custom import create_model_from_pretrained

    model = create_model_from_pretrained(
        spec.architecture, checkpoint_path=str(checkpoint), return_transform=False
    )
    return ConchVisual(model.visual)
