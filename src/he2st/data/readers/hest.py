"""A HEST-1k sample: ``st/<id>.h5ad``, ``wsis/<id>.tif`` and ``metadata/<id>.json`` under one root.

The metadata gives the whole-slide image's pixel size and the patient, so serial sections group by patient.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from he2st.data.readers.base import SourceOptions, register_reader, require
from he2st.data.readers.h5ad import read_h5ad_sample
from he2st.data.sample import VISIUM_SPOT_UM, Sample
from he2st.data.sample_header import id_from_file, is_missing
from he2st.errors import He2stError


@register_reader("hest")
class HestSource(SourceOptions):
    """``path`` is the HEST root (holding ``st/``, ``wsis/``, ``metadata/``); ``sample_id`` picks the sample."""

    def read(self) -> Sample:
        sample = read_hest(self.path, self.sample_id, patient_id=self.patient_id)
        if self.pixel_size_um is not None:
            sample.pixel_size_um = float(self.pixel_size_um)
        return sample


def read_hest(root: str | Path, sample_id: str, patient_id: str | None = None) -> Sample:
    """A HEST-1k sample: ``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``.

    The patient comes from ``patient_id``, else the metadata's ``patient`` (:func:`metadata_patient`); without
    either, the sample is its own patient -- then serial sections of one patient are not grouped, so pass it.
    A spot diameter or pixel size the metadata leaves empty (NaN in HEST's Xenium rows) is not a number to use.
    """
    meta, meta_path = read_metadata(root, sample_id)
    mpp = _positive(meta, "pixel_size_um_estimated", "pixel_size_um_embedded")
    if mpp is None:
        raise He2stError("metadata has no positive pixel_size_um_estimated or pixel_size_um_embedded", meta_path)
    image = require(Path(root) / "wsis" / f"{sample_id}.tif", "HEST whole-slide image")
    return read_h5ad_sample(
        Path(root) / "st" / f"{sample_id}.h5ad",
        image,
        pixel_size_um=mpp,
        sample_id=sample_id,
        patient_id=patient_id or metadata_patient(meta, sample_id, meta_path) or sample_id,
        spot_diameter_um=_positive(meta, "spot_diameter") or VISIUM_SPOT_UM,
        technology=str(meta.get("st_technology", "hest")).lower(),
        dataset="hest",
    )


def read_metadata(root: str | Path, sample_id: str) -> tuple[dict[str, Any], Path]:
    """``metadata/<sample_id>.json`` under the HEST root, and its path."""
    meta_path = require(Path(root) / "metadata" / f"{sample_id}.json", "HEST metadata")
    try:
        return json.loads(meta_path.read_text()), meta_path
    except (OSError, json.JSONDecodeError) as exc:
        raise He2stError(f"cannot parse HEST metadata ({exc})", meta_path) from exc


def metadata_patient(meta: dict[str, Any], sample_id: str, where: Path) -> str | None:
    """The metadata's ``patient`` as an id, runs of spaces made ``_`` (HEST's table writes ``Patient 27``) and
    then checked as any id read from a file is (one line naming ``where`` when it could leave a folder); None
    when it gives none (missing, NaN or blank)."""
    value = meta.get("patient")
    if is_missing(value):
        return None
    return id_from_file(re.sub(r"\s+", "_", str(value).strip()), f"patient id of sample {sample_id}", where)


def _positive(meta: dict[str, Any], *keys: str) -> float | None:
    """The first of ``keys`` that holds a finite positive number (NaN and empty are no value)."""
    for key in keys:
        try:
            value = float(meta.get(key))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None
