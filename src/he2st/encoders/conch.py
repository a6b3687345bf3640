"""CONCH (Lu et al., 2024) as an he2st backbone.

CONCH is a CoCa vision-language model distributed with its own package; its image
embedding comes from an attentional pooler on top of a timm ViT-B/16 trunk. Only the visual
tower is kept (the text tower is not needed for embeddings). The package cannot be a
dependency of he2st (it is installed from GitHub), so it is imported on demand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from he2st.encoders.spec import EncoderSpec
from he2st.encoders.weights import load_strict, read_state_dict
from he2st.errors import He2stError

INSTALL_HINT = "pip install git+https://github.com/mahmoodlab/CONCH"
_POS_EMBED = "visual.trunk.pos_embed"


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
    """Build CONCH's model from its package's config and load the visual tower of ``checkpoint`` strictly.

    CONCH's own loader (``create_model_from_pretrained``) loads with ``strict=False`` and ignores what
    did not fit, so a wrong or partial file would give random embeddings without a word; here every
    tensor of the visual tower must come from the file. The text towers are not used and not checked.
    """
    require_conch(spec)
    from conch.open_clip_custom import CoCa
    from conch.open_clip_custom.coca_model import resize_pos_embed
    from conch.open_clip_custom.factory import CFG_DIR

    config = json.loads((CFG_DIR / f"{spec.architecture}.json").read_text())
    config.pop("custom_text", None)  # a flag of CONCH's factory, not a CoCa argument
    model = CoCa(**config)
    state_dict = read_state_dict(checkpoint)
    if _POS_EMBED in state_dict:
        resize_pos_embed(state_dict, model)  # what CONCH's loader does for another input size
    visual = {key.removeprefix("visual."): value for key, value in state_dict.items() if key.startswith("visual.")}
    load_strict(model.visual, visual, checkpoint)
    return ConchVisual(model.visual)
