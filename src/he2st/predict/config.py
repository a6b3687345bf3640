"""``PredictConfig``: every setting of whole-slide prediction, with the same precedence as the other
commands (defaults < ``--config run.yaml`` < ``--set key=value`` < flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from he2st.io import comma_list, inside, safe_name
from he2st.predict.grid import VISIUM_PITCH_UM


class PredictConfig(BaseModel):
    """Where to predict, what to write, and how to encode the slide (``None``: as the model was trained)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite pitch or pixel size is no size

    model: Path | None = Field(None, description="checkpoint path, recorded in the output")
    slide: Path | None = Field(None, description="whole-slide image (SVS, NDPI, TIFF, JPEG, ...); "
                                                 "default: the image of spots_from")
    out: Path = Field(Path("he2st-predictions"), description="output folder")
    mpp: float | None = Field(None, gt=0, description="µm per level-0 pixel (default: from the file)")
    pitch_um: float = Field(VISIUM_PITCH_UM, gt=0, description="hexagonal grid pitch, µm (Visium: 100)")
    spots_from: Path | None = Field(None, description="predict at this he2st sample's spots (.h5ad)")
    mask: Path | None = Field(None, description="tissue mask PNG (the slide's aspect) instead of detection")
    genes: list[str] | None = Field(None, description="genes to write (default: the whole panel); beyond the panel "
                                    "from a transcriptome bank")
    transcriptome: bool = Field(False, description="write the panel and every gene of the model's transcriptome bank")
    coverage: float = Field(0.9, gt=0, lt=1, description="level of the per-spot prediction intervals (calibrated models)")
    chunk: int = Field(512, gt=0, description="spots per chunk (memory ~ chunk x patch size)")
    batch_size: int = Field(64, gt=0, description="encoder batch size")
    weights: Path | None = Field(None, description="encoder weights file (default: the model card's)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="encoder arithmetic: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16")
    format: Literal["h5ad", "zarr"] = Field(
        "h5ad", description="h5ad: one AnnData; zarr: also a SpatialData store beside it (image, spots, table in µm)")
    zarr_image: Literal["hires", "full"] = Field(
        "hires", description="image of the SpatialData store: hires (the 2,000 px view) or full (the whole slide, "
        "tile by tile)")
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="what runs the encoder (see `he2st embed`): auto = a validated ONNX graph on a CPU")
    stain: Literal["none", "macenko", "reinhard"] | None = Field(
        None, description="stain normalisation (default: as the model's training features)")
    tta: Literal["none", "flips", "d4"] | None = Field(
        None, description="test-time augmentation (default: as the model's training features)")
    library_id: str | None = Field(None, description="output name (default: slide file stem; sample id "
                                                     "with spots_from)")
    thumbnail_px: int = Field(2000, gt=0, description="long side of the thumbnail (tissue detection, hires image)")
    max_upsample: float | None = Field(
        None, gt=0,
        description="largest upsampling of the slide (default: 2x that of the model's coarsest training slide, at least 2x)")
    overwrite: bool = Field(False, description="replace outputs he2st did not write (default: refuse them)")

    @field_validator("library_id")
    @classmethod
    def _safe_library_id(cls, value: str | None) -> str | None:
        """The output file is ``<out>/<library_id>.h5ad``: an id like ``../x`` must not leave ``out``."""
        return None if value is None else safe_name(value, "library id")

    def output(self, library_id: str) -> Path:
        """``<out>/<library_id>.h5ad``, refused in one line when it would leave ``out`` (the id may come from a
        sample file's own metadata, not only from this config)."""
        return inside(self.out, self.out / f"{safe_name(library_id, 'library id')}.h5ad")

    @field_validator("genes", mode="before")
    @classmethod
    def _gene_list(cls, value: object) -> object:
        """Accept ``"G1,G2"`` and ``"panel"``/``"all"`` (the whole panel) as well as a list."""
        if isinstance(value, str):
            if value in ("panel", "all"):
                return None
            return comma_list(value) or []
        return value
