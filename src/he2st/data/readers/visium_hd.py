"""Visium HD: one of Space Ranger's square-bin folders, summed into square pseudo-spots of a Visium spot's size.

A model trained on 55 µm spots should see 55 µm fields; 2-16 µm bins are too sparse to train on alone.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from he2st.data.readers.base import SourceOptions, register_reader, require, sum_into_squares
from he2st.data.readers.visium import read_visium
from he2st.data.sample import VISIUM_SPOT_UM, Sample
from he2st.errors import He2stError

VISIUM_HD_BINS_UM = (2, 8, 16)


@register_reader("visium_hd")
class VisiumHdSource(SourceOptions):
    """A Visium HD ``outs/`` folder (holding ``binned_outputs/``) and the full-resolution H&E (``image``)."""

    bin_um: int = Field(8, description="the bins summed into pseudo-spots (2, 8 or 16 µm)")
    pseudo_spot_um: float = Field(VISIUM_SPOT_UM, gt=0, description="side of the square pseudo-spots, µm")

    def read(self) -> Sample:
        return read_visium_hd(self.path, self.image, self.sample_id, self.patient_id, self.bin_um,
                              self.pseudo_spot_um, pixel_size_um=self.pixel_size_um)


def read_visium_hd(
    outs: str | Path,
    image: str | Path | None,
    sample_id: str,
    patient_id: str | None = None,
    bin_um: int = 8,
    pseudo_spot_um: float = VISIUM_SPOT_UM,
    dataset: str | None = None,
    pixel_size_um: float | None = None,
) -> Sample:
    """A Visium HD ``outs/`` folder: the square bins of ``binned_outputs/square_<bin>um`` summed into square
    pseudo-spots of ``pseudo_spot_um`` (default 55 µm, a Visium spot's size, so a model sees the field it
    was trained on). Bins map to pseudo-spots by their centre; a pseudo-spot is kept when at least half of
    its area is covered by bins under tissue, so tissue edges do not make near-empty spots."""
    if bin_um not in VISIUM_HD_BINS_UM:
        raise He2stError(f"Visium HD bin size must be one of {VISIUM_HD_BINS_UM} µm, got {bin_um}")
    folder = require(Path(outs) / "binned_outputs" / f"square_{bin_um:03d}um", f"Visium HD {bin_um} µm bin folder")
    bins = read_visium(folder, image, sample_id=sample_id, patient_id=patient_id, dataset=dataset)
    if pixel_size_um is not None:
        bins.pixel_size_um = float(pixel_size_um)
    if pseudo_spot_um < bin_um:
        raise He2stError(f"pseudo-spots of {pseudo_spot_um:g} µm are smaller than the {bin_um} µm bins", folder)
    side_px = pseudo_spot_um / bins.pixel_size_um
    adata = sum_into_squares(bins.adata.X, bins.spatial, list(bins.adata.var_names), side_px,
                             0.5 * (pseudo_spot_um / bin_um) ** 2, "n_bins", folder)
    sample = Sample(
        sample_id=bins.sample_id, patient_id=bins.patient_id, adata=adata, pixel_size_um=bins.pixel_size_um,
        spot_diameter_um=float(pseudo_spot_um), image_path=bins.image_path, technology="visium_hd",
        dataset=dataset, source=bins.source | {"bin_um": str(bin_um), "pseudo_spot_um": f"{pseudo_spot_um:g}"},
    )
    sample.validate()
    return sample
