"""Xenium: a cell-resolution output folder and the H&E stained on the same section after the run.

Cells are placed on the H&E by the alignment matrix Xenium Explorer exports and, by default, summed into
square pseudo-spots of a Visium spot's size, the field the spot-level methods learn from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from he2st.data.readers.base import (
    SourceOptions,
    image_source,
    join_barcodes,
    register_reader,
    require,
    sum_into_squares,
)
from he2st.data.readers.tenx import read_10x_h5
from he2st.data.sample import VISIUM_SPOT_UM, Sample, build_adata
from he2st.errors import He2stError

XENIUM_PIXEL_UM = 0.2125  # the morphology image's µm/px (experiment.xenium "pixel_size")


@register_reader("xenium")
class XeniumSource(SourceOptions):
    """A Xenium output folder (``path``) and the post-run H&E (``image``) with its ``alignment``."""

    pseudo_spot_um: float = Field(VISIUM_SPOT_UM, gt=0, description="side of the square pseudo-spots, µm")
    cell_level: bool = Field(False, description="one spot per cell instead of pseudo-spots")
    alignment: Path | None = Field(None, description="the H&E alignment matrix (3 x 3 CSV, H&E px -> morphology px)")

    def read(self) -> Sample:
        return read_xenium(self.path, self.image, self.sample_id, self.patient_id, self.alignment,
                           self.pixel_size_um, None if self.cell_level else self.pseudo_spot_um)


def read_xenium(
    folder: str | Path,
    image: str | Path | None,
    sample_id: str,
    patient_id: str | None = None,
    alignment: str | Path | None = None,
    pixel_size_um: float | None = None,
    pseudo_spot_um: float | None = VISIUM_SPOT_UM,
    dataset: str | None = None,
) -> Sample:
    """A Xenium output folder and the H&E stained on the same section after the run.

    Cells: ``cell_feature_matrix.h5`` (gene-expression features only) and ``cells.parquet`` or
    ``cells.csv.gz`` (centroids in µm). They are placed on the H&E with ``alignment``, the 3 x 3 matrix
    Xenium Explorer's image alignment exports (H&E px -> morphology px, morphology px = µm / pixel_size of
    ``experiment.xenium``), which also gives the H&E's µm/px; without it the H&E must be in the Xenium frame
    at ``pixel_size_um``. Cells are summed into square pseudo-spots of ``pseudo_spot_um`` (kept when they
    hold at least half the median number of cells, so tissue edges do not make near-empty spots), or with
    ``pseudo_spot_um=None`` each cell is a spot of its own (spot diameter: the median cell's equivalent
    diameter)."""
    folder = require(Path(folder), "Xenium output folder")
    counts_path = require(folder / "cell_feature_matrix.h5", "cell_feature_matrix.h5")
    mat, cell_ids, genes = read_10x_h5(counts_path)
    cells = _read_cells(folder)
    morph_um = XENIUM_PIXEL_UM
    if (folder / "experiment.xenium").exists():
        try:
            morph_um = float(json.loads((folder / "experiment.xenium").read_text()).get("pixel_size", morph_um))
        except (OSError, ValueError) as exc:
            raise He2stError(f"cannot parse experiment.xenium ({exc})", folder / "experiment.xenium") from exc
    common = join_barcodes(pd.Index(cell_ids), cells.index, counts_path, folder / "cells")
    row_of = {c: i for i, c in enumerate(cell_ids)}
    counts = mat[np.array([row_of[c] for c in common])]
    um = cells.loc[common, ["x_centroid", "y_centroid"]].to_numpy(float)
    if alignment is not None:
        path = require(Path(alignment), "alignment matrix")
        try:
            matrix = np.loadtxt(path, delimiter=",").reshape(3, 3)
        except ValueError as exc:
            raise He2stError(f"not a 3 x 3 alignment matrix ({exc})", path) from exc
        morph = np.column_stack([um / morph_um, np.ones(len(um))])
        xy = (np.linalg.inv(matrix) @ morph.T).T[:, :2]
        mpp = morph_um * float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    elif pixel_size_um is not None:
        xy, mpp = um / pixel_size_um, float(pixel_size_um)
    else:
        raise He2stError(f"sample {sample_id}: Xenium needs the H&E alignment matrix (alignment) or pixel_size_um")
    if pixel_size_um is not None and alignment is not None:
        mpp = float(pixel_size_um)
    adata = build_adata(counts, list(common), genes, xy, where=counts_path)  # cells, checked before summing
    if pseudo_spot_um is None:
        area = cells.loc[common, "cell_area"].to_numpy(float) if "cell_area" in cells else np.array([78.5])
        spot_um = float(2 * np.sqrt(np.median(area) / np.pi))
    else:
        side_px = pseudo_spot_um / mpp
        per_square = np.unique(np.floor(xy / side_px).astype(np.int64), axis=0, return_counts=True)[1]
        adata = sum_into_squares(adata.X, xy, genes, side_px, 0.5 * float(np.median(per_square)), "n_cells", folder)
        spot_um = float(pseudo_spot_um)
    sample = Sample(
        sample_id=sample_id, patient_id=patient_id or sample_id, adata=adata, pixel_size_um=mpp,
        spot_diameter_um=spot_um, image_path=None if image is None else Path(image), technology="xenium",
        dataset=dataset, source={"counts": str(counts_path), "cells": str(folder)}
        | image_source(image) | ({"alignment": str(alignment)} if alignment else {}),
    )
    sample.validate()
    return sample


def _read_cells(folder: Path) -> pd.DataFrame:
    """Xenium's cell table (``cells.parquet``, else ``cells.csv.gz``/``cells.csv``) indexed by cell id."""
    for name in ("cells.parquet", "cells.csv.gz", "cells.csv"):
        path = folder / name
        if path.exists():
            break
    else:
        raise He2stError("no cells.parquet, cells.csv.gz or cells.csv", folder)
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except ImportError as exc:
        raise He2stError("reading parquet cells needs pyarrow: pip install 'he2st[formats]'", path) from exc
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise He2stError(f"cannot parse the cell table ({exc})", path) from exc
    missing = {"cell_id", "x_centroid", "y_centroid"} - set(table.columns)
    if missing:
        raise He2stError(f"cell table lacks columns {sorted(missing)}", path)
    table["cell_id"] = table["cell_id"].astype(str)
    return table.set_index("cell_id")
