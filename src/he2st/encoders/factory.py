"""``create``: turn an encoder name (preset or timm model) into a ready :class:`Encoder`.

The order of work is chosen so that failures are cheap: the weights are located (and the
hub consulted) *before* a possibly billion-parameter model is built, and they are loaded
strictly so a wrong checkpoint is an error instead of silently wrong embeddings.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
from pydantic import ValidationError
from torch import nn

from he2st.encoders.conch import build_conch, require_conch
from he2st.encoders.converters import convert_checkpoint
from he2st.encoders.efficientnet_lite import package_variant, package_weights_path
from he2st.encoders.encoder import Encoder
from he2st.encoders.presets import PRESETS, list_presets
from he2st.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, constructor_kwargs
from he2st.encoders.weights import (
    WeightSource,
    download_from_hub,
    first_line,
    hub_offline,
    load_strict,
    read_state_dict,
    registry_weights,
    weights_file,
)
from he2st.errors import He2stError, one_line

# create(**overrides) keys that change the spec; every other key is a model constructor argument.
_SPEC_OVERRIDES = frozenset({"input_size", "mean", "std", "interpolation", "pooling", "truncate_after"})
_TIMM_INTERPOLATIONS = frozenset({"bicubic", "bilinear", "nearest"})


def create(
    name: str, weights: str | Path | None = None, pretrained: bool = True, **overrides: Any
) -> Encoder:
    """Build the encoder ``name``: a preset (:func:`list_presets`) or any timm model name.

    Weights, first match wins: ``weights`` (a file, or a folder holding one); random init if
    ``pretrained`` is false; the file listed for ``name`` in ``$HE2ST_WEIGHTS``; the preset's
    bundled or hub weights (the hub only when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are
    not ``1``); timm's own pretrained weights for plain timm names.

    ``overrides`` may set spec fields (``input_size``, ``mean``, ``std``, ``interpolation``,
    ``pooling``, ``truncate_after``); all other keys go to the model constructor (e.g.
    ``reg_tokens=4`` for timm ViTs). The result is frozen and in eval mode.
    """
    preset = PRESETS.get(name)
    if preset is None and not timm.is_model(name):
        raise He2stError(_unknown_name_message(name))
    spec_overrides = {key: value for key, value in overrides.items() if key in _SPEC_OVERRIDES}
    model_overrides = {key: value for key, value in overrides.items() if key not in _SPEC_OVERRIDES}
    if preset is not None:
        preset = _validated(
            name,
            preset.model_dump(),
            spec_overrides,
            {"model_kwargs": {**preset.model_kwargs, **model_overrides}},
        )
    if preset is not None and preset.backend == "conch":
        return _create_conch(preset, weights, pretrained)

    source = _weight_source(name, preset, weights, pretrained)
    architecture = preset.architecture if preset is not None else name
    kwargs = preset.constructor_kwargs() if preset is not None else constructor_kwargs(model_overrides)
    model = _build_timm(architecture, kwargs, source)
    base = preset.model_dump() if preset is not None else _timm_spec_fields(name, model, model_overrides)
    spec = _validated(name, base, spec_overrides, {"weights": source.label})
    if spec.truncate_after and spec.pooling == "head" and "pooling" not in spec_overrides:
        spec = spec.model_copy(update={"pooling": "avg"})  # the head reads the last stage, which truncation drops

    _check_pooling(model, spec)
    removed = _truncate(model, spec.truncate_after) if spec.truncate_after else ()
    if source.path is not None:
        state_dict = convert_checkpoint(spec.checkpoint_format, read_state_dict(source.path), model)
        load_strict(model, state_dict, source.path, ignore_prefixes=(*_classifier_names(model), *removed))
    spec = spec.model_copy(update={"embed_dim": _embed_dim(model, spec)})
    return _frozen(Encoder(model, spec))


def _validated(name: str, base: dict[str, Any], *updates: dict[str, Any]) -> EncoderSpec:
    merged = dict(base)
    for update in updates:
        merged.update(update)
    try:
        return EncoderSpec.model_validate(merged)
    except ValidationError as exc:
        raise one_line(exc, f"encoder '{name}': invalid option") from exc


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, [*list_presets(), *timm.list_models()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown encoder '{name}': not an he2st preset or a timm model name{hint} "
        "(see he2st.encoders.list_presets() and timm.list_models())"
    )


def _weight_source(
    name: str, spec: EncoderSpec | None, weights: str | Path | None, pretrained: bool
) -> WeightSource:
    if weights is not None:
        path = weights_file(weights)
        return WeightSource("file", str(path), path)
    if not pretrained:
        return WeightSource("random", "random")
    registered = registry_weights(name)
    if registered is not None:
        return WeightSource("file", str(registered), registered)
    if spec is None:
        if hub_offline():
            raise He2stError(
                f"pretrained weights for timm model '{name}' not available offline: "
                "pass --weights /path/to/checkpoint or use pretrained=False"
            )
        return WeightSource("timm", f"timm:{name}")
    variant = package_variant(spec.weights)
    if variant is not None:
        return WeightSource("file", spec.weights, package_weights_path(variant))
    path = download_from_hub(spec)  # raises, naming the file to provide, when there is no hub copy
    return WeightSource("file", str(spec.hub_id), path)


def _build_timm(architecture: str, kwargs: dict[str, Any], source: WeightSource) -> nn.Module:
    try:
        return timm.create_model(architecture, pretrained=source.kind == "timm", num_classes=0, **kwargs)
    except Exception as exc:
        reason = first_line(exc)
        if source.kind == "timm":
            raise He2stError(
                f"pretrained weights for timm model '{architecture}' could not be loaded ({reason}): "
                "pass --weights /path/to/checkpoint or use pretrained=False"
            ) from exc
        options = ", ".join(f"{key}={value!r}" for key, value in kwargs.items()) or "no options"
        raise He2stError(f"could not build timm model '{architecture}' with {options}: {reason}") from exc


def _timm_spec_fields(name: str, model: nn.Module, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Spec fields for a plain timm model, from the preprocessing timm records for its weights."""
    cfg = model.pretrained_cfg
    img_size = model_kwargs.get("img_size")
    interpolation = cfg.get("interpolation", "bicubic")
    has_cls = getattr(model, "cls_token", None) is not None
    return {
        "name": name,
        "architecture": name,
        "input_size": img_size if isinstance(img_size, int) else cfg.get("input_size", (3, 224, 224))[-1],
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
        "interpolation": interpolation if interpolation in _TIMM_INTERPOLATIONS else "bicubic",
        # timm's own pooled features (``forward_head(pre_logits=True)``): a plain mean of the tokens would skip
        # what a model's head does before its classifier (ConvNeXt's norm, SigLIP's attention pool, ...)
        "pooling": "cls" if has_cls and getattr(model, "global_pool", "token") in ("token", "") else "head",
        "embed_dim": model.num_features,
        "model_kwargs": model_kwargs,
    }


def _truncate(model: nn.Module, after: str) -> tuple[str, ...]:
    """Replace the feature stages after ``after`` by identities; returns their names."""
    stages = [info["module"] for info in getattr(model, "feature_info", [])]
    if after not in stages:
        raise He2stError(
            f"cannot truncate after '{after}': the model's stages are {', '.join(stages) or 'unknown'}"
        )
    removed = tuple(stages[stages.index(after) + 1 :])
    for stage in removed:
        parent_name, _, child = stage.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return removed


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _check_pooling(model: nn.Module, spec: EncoderSpec) -> None:
    if spec.pooling in ("cls", "cls+mean_after_registers") and getattr(model, "cls_token", None) is None:
        raise He2stError(
            f"pooling '{spec.pooling}' needs a class token, which '{spec.architecture}' does not have"
        )
    if spec.pooling == "attentional":
        raise He2stError(f"pooling 'attentional' is only available for CONCH, not '{spec.architecture}'")
    if spec.pooling == "head" and spec.truncate_after:
        raise He2stError(f"pooling 'head' reads the last stage of '{spec.architecture}', which truncate_after "
                         f"'{spec.truncate_after}' removes; use pooling 'avg'")


def _embed_dim(model: nn.Module, spec: EncoderSpec) -> int:
    if spec.truncate_after:
        width = next(info["num_chs"] for info in model.feature_info if info["module"] == spec.truncate_after)
    elif spec.pooling == "head":
        width = getattr(model, "head_hidden_size", None) or model.num_features  # e.g. MobileNetV3's conv head
    else:
        width = model.num_features
    return 2 * width if spec.pooling == "cls+mean_after_registers" else width


def _create_conch(spec: EncoderSpec, weights: str | Path | None, pretrained: bool) -> Encoder:
    require_conch(spec)
    if weights is None and not pretrained:
        raise He2stError(f"{spec.name} can only be built from its released weights; pass --weights")
    source = _weight_source(spec.name, spec, weights, pretrained=True)
    backbone = build_conch(spec, source.path)
    return _frozen(Encoder(backbone, spec.model_copy(update={"weights": source.label})))


def _frozen(encoder: Encoder) -> Encoder:
    return encoder.set_trainable(False).eval()
