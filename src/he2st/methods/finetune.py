"""Training the image encoder end to end (the GPU path), shared by the methods that offer it.

BLEEP fine-tunes its ResNet-50 and CMRCNet trains its ViT from scratch; he2st's CPU path keeps the
encoder frozen and reads cached embeddings instead. A method that offers the end-to-end path mixes
:class:`FinetuneConfig` into its options, builds its encoder with :func:`trainable_encoder` and feeds it
:func:`patch_batch` (the pipeline then loads patches: :attr:`~he2st.methods.base.Method.uses_patches`).
"""

from __future__ import annotations

import torch

from he2st.data.patch_rows import take_patches
from he2st.data.spots import SpotSet
from he2st.encoders import Encoder, create
from he2st.encoders.augment import augment_batch
from he2st.errors import He2stError
from he2st.methods.card import ModelCard
from he2st.methods.configs.common import FinetuneConfig


def trainable_encoder(config: FinetuneConfig, card: ModelCard | None, pretrained: bool = True) -> Encoder:
    """The encoder named by ``config`` (else the card's), with gradients on; ``pretrained=False`` skips
    loading weights (they will come from a checkpoint)."""
    name = config.encoder or (card.encoder.name if card is not None and card.encoder is not None else None)
    if name is None:
        raise He2stError("finetune_encoder needs the `encoder` option or a model card with an encoder")
    weights = pretrained and config.encoder_pretrained
    return create(name, weights=config.encoder_weights, pretrained=weights).set_trainable(True)


def patch_batch(
    encoder: Encoder, spots: SpotSet, idx: torch.Tensor, augment: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """The patches of ``spots`` at ``idx``, augmented when ``augment``, preprocessed for ``encoder``; patches
    loaded from the caches are read here, one batch at a time, so training memory does not grow with the spots."""
    if spots.patches is None:
        raise He2stError("finetune_encoder needs patches (load spots with with_patches=True)")
    patches = torch.from_numpy(take_patches(spots.patches, idx.numpy()))
    if augment:
        patches = augment_batch(patches, generator)
    return encoder.preprocess(patches)
