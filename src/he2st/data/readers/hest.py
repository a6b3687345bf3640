"""A HEST-1k sample: ``st/<id>.h5ad``, ``wsis/<id>.tif`` and ``metadata/<id>.json`` under one root.

The metadata gives the whole-slide image's pixel size and the patient, so serial sections group by patient.
"""

from __future__ import annotations

import json
from pathlib import Path

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

    The patient comes from ``patient_id``, else the metadata's ``patient``; without either (a missing,
    NaN or empty ``patient``), the sample is its own patient -- then serial sections of one patient are not
    grouped, so pass it.
    """
    root = Path(root)
    meta_path = require(root / "metadata" / f"{sample_id}.json", "HEST metadata")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise He2stError(f"cannot parse HEST metadata ({exc})", meta_path) from exc
    mpp = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
    if not mpp:
        raise He2stError("metadata has no pixel_size_um_estimated", meta_path)
    image = require(root / "wsis" / f"{sample_id}.tif", "HEST whole-slide image")
    return read_h5ad_sample(
        root / "st" / f"{sample_id}.h5ad",
        image,
        pixel_size_um=float(mpp),
        sample_id=sample_id,
        patient_id=patient_id or id_from_file(sample_id if is_missing(meta.get("patient")) else meta["patient"],
                                             f"patient id of sample {sample_id}", meta_path),
        spot_diameter_um=float(meta.get("spot_diameter") or VISIUM_SPOT_UM),
        technology=str(meta.get("st_technology", "hest")).lower(),
        dataset="hest",
    )
