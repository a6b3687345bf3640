"""Methods by name, filled the way timm fills its model registry: ``@register_method`` on each class.

``create_method("bleep", top_k=20)`` builds one; ``load_method(path)`` rebuilds a saved one from the
name its checkpoint records. Faithful presets and ablation rows are declared next to their method.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import ValidationError

from he2st.errors import He2stError
from he2st.io import file_type, input_path
from he2st.methods.bank import ReferenceBank
from he2st.methods.base import CHECKPOINT_FORMAT, Method
from he2st.methods.card import ModelCard

_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise He2stError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_method(name: str, **options: Any) -> Method:
    return method_class(name)(**options)


def load_method(path: str | Path) -> Method:
    """Load any method's checkpoint safely (tensors and JSON only; pickled objects are refused)."""
    path = input_path(path, "checkpoint")
    kind = file_type(path)
    if not kind.startswith("a zip archive"):  # torch.save writes a zip archive
        raise He2stError(f"not a he2st checkpoint: it is {kind} (a checkpoint is the .pt file `he2st train` "
                         "writes)", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # objects other than tensors and plain values
        raise He2stError("refusing checkpoint: it holds pickled objects, not only tensors and JSON (not a safe "
                         "he2st checkpoint)", path) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged archives
        raise He2stError(f"not a readable checkpoint: truncated or corrupt ({type(exc).__name__})", path) from exc
    if not isinstance(payload, dict) or "method" not in payload or "format" not in payload:
        raise He2stError("not a he2st checkpoint (missing format/method)", path)
    if payload["format"] != CHECKPOINT_FORMAT:
        raise He2stError(f"checkpoint format {payload['format']} is not this he2st's ({CHECKPOINT_FORMAT}); "
                         "re-train the model with this version", path)
    cls = method_class(payload["method"])
    try:
        method = cls(cls.Config.model_validate_json(payload["config"]))
        method.card = ModelCard.model_validate_json(payload["card"])
        layout = json.loads(payload["layout"])
        state = payload["state"]
    except (ValidationError, ValueError, KeyError, TypeError) as exc:
        raise He2stError(f"checkpoint does not match this he2st version ({type(exc).__name__})", path) from exc
    try:
        method.load_state(state, layout)
    except (RuntimeError, KeyError) as exc:  # weights of an older layout (e.g. mlp's former projection layer)
        raise He2stError(f"checkpoint's {payload['method']} weights do not fit this he2st version "
                         f"({type(exc).__name__}); re-train the model with this version", path) from exc
    if Method.bank_path(path).exists():
        method.bank = ReferenceBank.load(Method.bank_path(path))
    return method
