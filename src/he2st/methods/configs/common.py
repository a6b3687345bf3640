"""Options shared by several methods: the base of every method's options, training, the end-to-end
encoder path and contrastive retrieval."""

from __future__ import annotations

import copy
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, create_model, model_validator


class MethodConfig(BaseModel):
    """Base of every method's options (documented field by field in each subclass)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seed of initialisation, shuffling and sampling")
    context_neighbours: int = Field(
        0, ge=0, le=64, description="append to each spot's features the mean of its k nearest spots' features (same "
        "slide); 0: none")
    context_field: bool = Field(
        False, description="append the features of the field 3x the spot's size around it (cut by `he2st prepare`)")
    views: list[str] = Field(
        default_factory=list, description="append these views' features: 'field', 'tiles' (2 x 2 sub-spot tiles), "
        "'adapted[-<recipe>]', an encoder")
    smooth_neighbours: int = Field(
        0, ge=0, le=64, description="average each predicted spot with its k nearest spots' predictions (same slide); "
        "0: off")
    within_sample: bool = Field(
        False, description="learn each training sample's deviations from its own mean expression, not its level")

    @model_validator(mode="before")
    @classmethod
    def _groups_within_own_defaults(cls, data: Any) -> Any:
        """A group of options given in part (``train: {epochs: 40}``) keeps this method's defaults for the rest
        of the group. Left to pydantic, the group would be built from its class's generic defaults, so setting
        ``bleep``'s epochs would silently move its learning rate from its own 3e-4 to the generic 1e-3."""
        if not isinstance(data, dict):
            return data
        defaults = {}
        for name, value in data.items():
            info = cls.model_fields.get(name)
            default = None if info is None or not isinstance(value, dict) else info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                defaults[name] = default.model_dump()
        return merged_groups(defaults, data)


def merged_groups(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``given``, where a group of options (a dict) given in part updates that group of
    ``base`` instead of replacing it."""
    return base | {k: base[k] | v if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                   for k, v in given.items()}


C = TypeVar("C", bound=MethodConfig)


def preset(config: type[C], name: str, doc: str, **defaults: Any) -> type[C]:
    """A named variant of a method's options, as timm's presets: ``config`` with other defaults for the
    listed options; types, bounds and descriptions stay those of ``config``."""
    fields = {}
    for option, value in defaults.items():
        info = copy.copy(config.model_fields[option])
        info.default, info.default_factory = value, None
        fields[option] = (info.annotation, info)
    return create_model(name, __base__=config, __doc__=doc, __module__=config.__module__, **fields)


class TrainConfig(BaseModel):
    """Optimiser (AdamW), learning-rate schedule and early stopping of a neural method."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(60, gt=0, description="most training epochs")
    batch_size: int = Field(128, gt=1, description="spots per optimiser step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (the starting value under a schedule)")
    weight_decay: float = Field(
        1e-3, ge=0, description="AdamW's decoupled weight decay; 0 is plain Adam (NH2ST)")
    patience: int = Field(10, gt=0, description="epochs without validation improvement before stopping")
    min_delta: float = Field(
        1e-3, ge=0, description="validation gain that restarts the patience; smaller gains still keep their weights")
    grad_clip: float | None = Field(5.0, description="clip the gradient norm at this value; None: no clipping")
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="learning rate per epoch: 'cosine' decays to min_lr by the last epoch (CMRCNet), "
        "'step' is StepLR (NH2ST)")
    min_lr: float = Field(0.0, ge=0, description="learning rate of the last epoch for schedule='cosine'")
    step_epochs: int = Field(50, gt=0, description="epochs between decays for schedule='step'")
    gamma: float = Field(0.9, gt=0, le=1, description="decay factor for schedule='step'")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="training steps' arithmetic: 'bf16' autocasts matrix products, weights stay fp32")


class FinetuneConfig(MethodConfig):
    """Options of the end-to-end path (the image encoder trained on patches)."""

    finetune_encoder: bool = Field(
        False, description="train the image encoder end to end on patches (GPU path)")
    encoder: str | None = Field(
        None, description="encoder preset or timm name for finetune_encoder (default: the model card's encoder)")
    encoder_weights: str | None = Field(None, description="local weights file for that encoder")
    encoder_pretrained: bool = Field(
        True, description="start from pretrained weights (False: train from scratch)")
    augment: bool = Field(True, description="dihedral and colour augmentation of patches when fine-tuning")


class RetrievalConfig(MethodConfig):
    """Options shared by the contrastive retrieval methods (alignment loss, towers, retrieval)."""

    seed: int = Field(0, description="seed of initialisation, shuffling, masking and augmentation")
    projection_dim: int = Field(256, gt=0, description="joint embedding size (BLEEP/CMRCNet: 256)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside the projection heads and encoders")
    expression_encoder: Literal["projection", "mlp"] = Field(
        "mlp", description="expression tower: BLEEP's projection head ('projection') or an MLP encoder ('mlp')")
    mlp_hidden: list[PositiveInt] = Field(
        default_factory=lambda: [512], description="hidden widths of the MLP expression encoder")
    loss: Literal["bleep_soft", "contrastive"] = Field(
        "contrastive", description="'bleep_soft': BLEEP's soft CLIP loss, fixed τ, unnormalised; 'contrastive': "
        "L2-normalised, learned τ")
    temperature: float = Field(
        0.07, gt=0, description="τ of the alignment loss (BLEEP: 1.0); the initial value when learned")
    learn_temperature: bool = Field(True, description="learn τ (loss='contrastive' only)")
    soft_targets: bool = Field(
        True, description="BLEEP-style soft targets from expression similarity (False: identity targets, InfoNCE)")
    target_temperature: float = Field(0.1, gt=0, description="fixed temperature of the soft targets")
    negatives: Literal["batch", "all"] = Field(
        "all", description="'batch': in-batch negatives; 'all': also spots sampled from a per-epoch bank of every "
        "training spot")
    bank_negatives: int = Field(
        1024, gt=0, description="bank spots contrasted with each batch for negatives='all' (all of them when fewer)")
    top_k: int = Field(50, gt=0, description="reference spots retrieved per query")
    weighting: Literal["average", "softmax", "similarity"] = Field(
        "softmax", description="how retrieved profiles are combined (BLEEP/CMRCNet: 'average')")
    weighting_temperature: float = Field(0.05, gt=0, description="temperature of weighting='softmax'")
    query_neighbours: int = Field(
        0, ge=0, description="average each query's image embedding with its k nearest spots' (same slide); 0: off")
    per_sample: bool = Field(
        True, description="retrieve top_k within each reference sample and average the samples; False: one pooled "
        "top_k")
    max_validation_spots: int | None = Field(
        2000, gt=1, description="validation spots each epoch scores: a fixed seeded sample when there are more; "
        "None: all")
