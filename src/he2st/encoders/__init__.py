"""Patch encoders: pretrained backbones with their preprocessing and pooling.

``create(name)`` accepts a preset (``list_presets()``: the offline ImageNet
``efficientnet_lite0`` default and pathology foundation models such as UNI, Virchow2,
H-optimus) or any timm model name, and returns an :class:`Encoder` whose ``preprocess``
turns uint8 patches into the normalised input its weights expect. Stain normalisation lives
in :mod:`he2st.encoders.stain`, test-time augmentation in :mod:`he2st.encoders.tta`.
"""

from he2st.data.embeddings import DEFAULT_ENCODER
from he2st.encoders.efficientnet_lite import load_efficientnet_lite0_classifier
from he2st.encoders.encoder import Encoder
from he2st.encoders.factory import create
from he2st.encoders.presets import list_presets
from he2st.encoders.spec import EncoderSpec

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "EncoderSpec",
    "create",
    "list_presets",
    "load_efficientnet_lite0_classifier",
]
