"""Methods by name, filled the way timm fills its model registry: ``@register_method`` on each class.

``create_method("bleep", top_k=20)`` builds one; ``load_method(path)`` rebuilds a saved one from the
name its checkpoint records. Faithful presets and ablation rows are declared next to their method.

:data:`METHODS` lists every method with its module, its options and one line on what it is, so that
``list_methods``, ``method_config`` and ``he2st methods`` work without importing torch; ``method_class``
imports the method's module on first use, where ``@register_method`` registers the class and checks it
against its entry. A new method is a decorated class plus its line here.
"""

from __future__ import annotations

import importlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from he2st.errors import He2stError

from he2st.io import file_type, input_path

if TYPE_CHECKING:
    from he2st.methods.base import Method
    from he2st.methods.card import ModelCard


@dataclass(frozen=True)
class MethodEntry:
    """Where a registered method lives, read without importing it."""

    module: str  # the module whose ``@register_method`` class implements the method
    config: str  # "module:Name" of its options (a torch-free module of he2st.methods.configs)
    summary: str  # one line on what it is (the first paragraph of the class docstring)
    #: fitting seconds per 1,000 training spots with its default options on the reference machine (2 CPU cores),
    #: as ``benchmarks/method_costs.py`` measures it: what the ensemble's ``cost_budget`` compares
    cost: float = 0.0


_C = "he2st.methods.configs"
METHODS: dict[str, MethodEntry] = {
    "bleep": MethodEntry(
        "he2st.methods.models.bleep", f"{_C}.bleep:BLEEPConfig",
        "BLEEP, improved: normalised embeddings, learned temperature, whole-set negatives, 5 heads, neighbour context.",
        cost=4.3),
    "bleep_faithful": MethodEntry(
        "he2st.methods.models.bleep", f"{_C}.bleep:BLEEPFaithfulConfig",
        "BLEEP as published: soft-target CLIP loss at τ=1, projection heads, top-50 average.",
        cost=3.3),
    "carhe": MethodEntry(
        "he2st.methods.models.carhe", f"{_C}.carhe:CarHEConfig",
        "CarHE: image-expression-proportion alignment, histology transfer, retrieval from a whole-transcriptome bank.",
        cost=4.0),
    "cmrcnet": MethodEntry(
        "he2st.methods.models.cmrc", f"{_C}.cmrc:CMRCNetConfig",
        "CMRCNet: BLEEP's contrastive alignment plus cross-modal masked reconstruction; retrieval at inference.",
        cost=5.4),
    "cmrcnet_faithful": MethodEntry(
        "he2st.methods.models.cmrc", f"{_C}.cmrc:CMRCNetFaithfulConfig",
        "CMRCNet as published: BLEEP's loss at τ=1, CMRCNet's one-way shared fusion, AdamW 1e-4 cosine, batch 64.",
        cost=53),
    "ensemble": MethodEntry(
        "he2st.methods.models.ensemble", f"{_C}.ensemble:EnsembleConfig",
        "he2st's default: knn, bleep, ridge_cv, carhe and other methods within a budget, stacked by nested cross-validation."),
    "knn": MethodEntry(
        "he2st.methods.models.baselines", f"{_C}.baselines:KNNConfig",
        "Image-to-image retrieval: the expression of the training spots that look most alike.",
        cost=0.03),
    "mlp": MethodEntry(
        "he2st.methods.models.baselines", f"{_C}.baselines:MLPConfig",
        "ST-Net-style regression: an MLP from frozen image features to every panel gene; the mean of several seeds.",
        cost=4.3),
    "nh2st": MethodEntry(
        "he2st.methods.models.nh2st", f"{_C}.nh2st:NH2STConfig",
        "NH2ST: neighbourhood hypergraphs, cross-attention, InfoNCE and a regression head that reads images only.",
        cost=10),
    "nh2st_faithful": MethodEntry(
        "he2st.methods.models.nh2st", f"{_C}.nh2st:NH2STFaithfulConfig",
        "NH2ST as published, on frozen features: its layers, image-built hyperedges, one-way InfoNCE, Adam + StepLR.",
        cost=71),
    "ridge": MethodEntry(
        "he2st.methods.models.baselines", f"{_C}.baselines:RidgeConfig",
        "HEST-Benchmark's linear probe: StandardScaler, PCA to 256 components, Ridge.",
        cost=0.6),
    "ridge_cv": MethodEntry(
        "he2st.methods.models.baselines", f"{_C}.baselines:RidgeCVConfig",
        "The ridge probe with alpha chosen by inner cross-validation over training patients, and an intercept.",
        cost=0.6),
}

_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound="type[Method]")


def summary_of(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name`` (it must match its :data:`METHODS` entry)."""
    entry = METHODS.get(cls.name)
    if entry is None:
        raise ValueError(f"method {cls.name!r} has no entry in he2st.methods.registry.METHODS: add its module, "
                         "options and summary there")
    if cls.__module__ != entry.module or cls.Config is not method_config(cls.name) or summary_of(cls) != entry.summary:
        raise ValueError(f"method {cls.name!r} does not match its METHODS entry (module, options class or the "
                         "first paragraph of its docstring)")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(METHODS)


def _entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise He2stError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_summary(name: str) -> str:
    """One line on what the method is (no import of the method)."""
    return _entry(name).summary


def method_config(name: str) -> type[BaseModel]:
    """The method's options class, imported without torch."""
    module, _, attr = _entry(name).config.partition(":")
    return getattr(importlib.import_module(module), attr)


def method_class(name: str) -> type[Method]:
    """The method's class (its module, and so torch, is imported on first use)."""
    importlib.import_module(_entry(name).module)
    return _REGISTRY[name]


def create_method(name: str, **options: Any) -> Method:
    return method_class(name)(**options)


def load_method(path: str | Path) -> Method:
    """Load any method's checkpoint safely (tensors and JSON only; pickled objects are refused)."""
    import torch

    from he2st.methods.base import Method
    from he2st.methods.card import ModelCard
    from he2st.methods.checkpoint import CHECKPOINT_FORMAT
    from he2st.methods.layers.bank import ReferenceBank, saved_pair
    from he2st.methods.reliability import Reliability

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
    except (RuntimeError, KeyError) as exc:  # weights that do not fit the method's current layout
        raise He2stError(f"checkpoint's {payload['method']} weights do not fit this he2st version "
                         f"({type(exc).__name__}); re-train the model with this version", path) from exc
    if "reliability" in payload:
        saved = payload["reliability"]
        method.reliability = Reliability.from_state(saved["state"], json.loads(saved["layout"]))
    pairs = payload.get("banks")  # absent from checkpoints of older he2st versions: any bank beside it is read
    for key, bank_path in (("bank", Method.bank_path(path)), ("transcriptome", Method.transcriptome_path(path))):
        token = pairs.get(key) if isinstance(pairs, dict) else None
        if token is None and (pairs is not None or not bank_path.exists()):
            continue
        if not bank_path.exists():
            raise He2stError(f"reference bank of the checkpoint {path.name} not found (it is saved beside the "
                             "checkpoint: copy the two together)", bank_path)
        bank = ReferenceBank.load(bank_path)
        if token is not None and saved_pair(bank_path) != token:
            raise He2stError(f"reference bank was not saved with the checkpoint {path.name} beside it (a save "
                             "stopped between the two files?); train the model again", bank_path)
        setattr(method, "bank" if key == "bank" else "transcriptome_bank", bank)
    return method


def read_card(path: str | Path) -> ModelCard:
    """A checkpoint's model card, read from its zip archive without torch when it can be (``he2st card``);
    anything unexpected falls back to :func:`load_method`, which checks the whole checkpoint."""
    from he2st.methods.card import ModelCard
    from he2st.methods.checkpoint import CHECKPOINT_FORMAT, read_json_fields

    path = Path(path)
    fields = read_json_fields(path, ("format", "method", "card"))
    if fields and fields.get("method") in METHODS and fields.get("format") == CHECKPOINT_FORMAT:
        try:
            return ModelCard.model_validate_json(fields["card"])
        except (ValidationError, ValueError, TypeError, KeyError):
            pass
    return load_method(path).card
