"""Patch encoders: pretrained backbones with their preprocessing and pooling.

``create(name)`` accepts a preset (``list_presets()``: the offline ImageNet
``efficientnet_lite0`` default, its larger offline siblings ``efficientnet_lite1`` and
``efficientnet_lite2``, and pathology foundation models such as UNI, Virchow2, H-optimus) or any
timm model name, and returns an :class:`Encoder` whose ``preprocess``
turns uint8 patches into the normalised input its weights expect. Stain normalisation lives
in :mod:`he2st.encoders.stain`, test-time augmentation in :mod:`he2st.encoders.tta`.
Names load on first use, so reading an :class:`EncoderSpec` (a model card's) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DEFAULT_ENCODER": "he2st.data.embeddings",
    "Encoder": "he2st.encoders.encoder",
    "EncoderSpec": "he2st.encoders.spec",
    "create": "he2st.encoders.factory",
    "list_presets": "he2st.encoders.presets",
    "load_efficientnet_lite_classifier": "he2st.encoders.efficientnet_lite",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'he2st.encoders' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
