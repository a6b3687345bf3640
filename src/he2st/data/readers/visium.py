"""10x Visium (v1, v2, CytAssist) as Space Ranger writes it and as it is published.

``path`` is Space Ranger's ``outs/`` folder, or the same files loose in one folder as GEO and 10x's
download pages ship them: behind a sample prefix (``GSM1234_tissue_positions_list.csv.gz``) and often
gzipped. Counts come from ``filtered_feature_bc_matrix.h5`` or the ``filtered_feature_bc_matrix/`` Matrix
Market files; positions from ``tissue_positions.csv`` (Space Ranger 2 and later, with a header),
``tissue_positions_list.csv`` (1.x, without) or ``tissue_positions.parquet`` (Visium HD). Only spots under
tissue are kept.

The full-resolution H&E given to Space Ranger is not part of its output. When the source names it
(``image``), spots are placed in its pixels. Without it, the reader uses the ``tissue_hires_image.png``
(else ``tissue_lowres_image.png``) Space Ranger does write, mapping full-resolution pixels onto it by the
image's scale factor; the pixel size follows from ``spot_diameter_fullres`` (the pixels a theoretical
65 µm spot spans), so a published sample with no full-resolution image still trains and predicts at its
true scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from he2st.data.readers.base import (
    SourceOptions,
    find_file,
    image_source,
    join_barcodes,
    open_text,
    register_reader,
    require,
)
from he2st.data.readers.tenx import Matrix, read_10x_h5, read_10x_mtx
from he2st.data.sample import SCALEFACTOR_SPOT_UM, VISIUM_SPOT_UM, Sample, build_adata
from he2st.errors import He2stError

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")
# the images Space Ranger writes, best first, with the scale factor from full-resolution pixels to each
BUNDLED_IMAGES = (("tissue_hires_image.png", "tissue_hires_scalef"), ("tissue_lowres_image.png", "tissue_lowres_scalef"))


@register_reader("visium")
class VisiumSource(SourceOptions):
    """A Space Ranger ``outs/`` folder (or its files loose in one folder, GEO-named); ``image``: the
    full-resolution H&E, else the hires image in ``spatial/`` is used."""

    def read(self) -> Sample:
        sample = read_visium(self.path, self.image, sample_id=self.sample_id, patient_id=self.patient_id)
        if self.pixel_size_um is not None:
            sample.pixel_size_um = float(self.pixel_size_um)
        return sample


def read_counts(outs: Path) -> tuple[Path, Matrix]:
    """The filtered feature-barcode matrix of ``outs``: the HDF5 file, else the Matrix Market trio (in
    ``filtered_feature_bc_matrix/`` or loose beside the other files)."""
    h5 = find_file([outs], "filtered_feature_bc_matrix.h5")
    if h5 is not None:
        return h5, read_10x_h5(h5)
    matrix = find_file([outs / "filtered_feature_bc_matrix", outs], "matrix.mtx")
    if matrix is None:
        raise He2stError("no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ matrix.mtx", outs)
    companions = [find_file([matrix.parent], name) for name in ("barcodes.tsv", "features.tsv")]
    if None in companions:
        raise He2stError("matrix.mtx without its barcodes.tsv and features.tsv", matrix.parent)
    return matrix, read_10x_mtx(matrix, *companions)


def read_tissue_positions(path: Path) -> pd.DataFrame:
    """Space Ranger spot positions indexed by barcode: ``tissue_positions.csv`` (header),
    ``tissue_positions_list.csv`` (none), either gzipped, or ``tissue_positions.parquet``."""
    try:
        if path.suffix == ".parquet":
            try:
                table = pd.read_parquet(path)
            except ImportError as exc:
                raise He2stError("reading parquet positions needs pyarrow: pip install 'he2st[formats]'", path) from exc
        else:
            first = str(pd.read_csv(path, header=None, nrows=1).iloc[0, 0]).strip()
            header = 0 if first == "barcode" else None
            table = pd.read_csv(path, header=header)
            if header is None:
                table.columns = POSITION_COLUMNS[: table.shape[1]]
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:  # ParserError/EmptyDataError are ValueErrors
        raise He2stError(f"cannot parse tissue positions ({exc})", path) from exc
    missing = set(POSITION_COLUMNS) - set(table.columns)
    if missing:
        raise He2stError(f"tissue positions lack columns {sorted(missing)}", path)
    table = table.set_index("barcode")
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        raise He2stError(f"duplicate spot barcode {table.index[table.index.duplicated()][0]!r}", path)
    return table


def read_scalefactors(path: Path) -> dict[str, float]:
    """``scalefactors_json.json`` (maybe gzipped): spot diameter and image scales in full-resolution pixels."""
    try:
        with open_text(path) as fh:
            factors = json.load(fh)
    except (OSError, ValueError, EOFError) as exc:
        raise He2stError(f"cannot parse scale factors ({exc})", path) from exc
    if not isinstance(factors, dict):
        raise He2stError("scale factors must be a JSON object", path)
    return factors


def bundled_image(folders: list[Path], factors: dict[str, float], factors_path: Path) -> tuple[Path | None, float]:
    """Space Ranger's own image of the section and its scale from full-resolution pixels, hires first;
    ``(None, 1.0)`` when ``spatial/`` holds neither (an expression-only section)."""
    for name, key in BUNDLED_IMAGES:
        path = find_file(folders, name)
        if path is not None:
            scale = factors.get(key)
            if not isinstance(scale, int | float) or not scale > 0:
                raise He2stError(f"{key} missing or not positive, needed to place spots on {path.name}", factors_path)
            return path, float(scale)
    return None, 1.0


def full_resolution_pixel_um(factors: dict[str, float], factors_path: Path) -> float:
    """µm per full-resolution pixel: ``microns_per_pixel`` when Space Ranger wrote it (Visium HD), else
    the theoretical 65 µm spot that ``spot_diameter_fullres`` spans."""
    for key in ("microns_per_pixel", "spot_diameter_fullres"):
        if factors.get(key) is None:
            continue
        try:
            value = float(factors[key])
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise He2stError(f"{key} is {factors[key]!r}, not a positive number", factors_path)
        return value if key == "microns_per_pixel" else SCALEFACTOR_SPOT_UM / value
    raise He2stError("neither microns_per_pixel nor spot_diameter_fullres present", factors_path)


def read_visium(
    outs: str | Path,
    image: str | Path | None,
    sample_id: str | None = None,
    patient_id: str | None = None,
    dataset: str | None = None,
) -> Sample:
    """10x Space Ranger ``outs/`` folder (Visium v1/v2/CytAssist, or one Visium HD bin folder), or its files
    loose in one folder. ``image``: the full-resolution H&E given to Space Ranger; without it, Space Ranger's
    hires (else lowres) image, with positions and pixel size scaled onto it (module docstring)."""
    outs = require(Path(outs), "Space Ranger outs folder")
    folders = [outs / "spatial", outs]
    counts_path, (mat, barcodes, genes) = read_counts(outs)
    pos_path = next((p for p in (find_file(folders, n) for n in POSITION_FILES) if p is not None), None)
    if pos_path is None:
        raise He2stError(f"no {', '.join(POSITION_FILES)} in spatial/ or beside the counts", outs)
    positions = read_tissue_positions(pos_path)
    sf_path = find_file(folders, "scalefactors_json.json")
    if sf_path is None:
        raise He2stError("no scalefactors_json.json in spatial/ or beside the counts", outs)
    factors = read_scalefactors(sf_path)
    if pd.Index(barcodes).has_duplicates:
        raise He2stError("duplicate barcodes in the count matrix", counts_path)
    common = join_barcodes(pd.Index(barcodes), positions.index, counts_path, pos_path)
    positions = positions.loc[common]
    positions = positions[positions["in_tissue"].astype(int) == 1]
    if len(positions) == 0:
        raise He2stError("no spot left after keeping spots under tissue (in_tissue == 1)", pos_path)
    image_path, scale = (Path(image), 1.0) if image is not None else bundled_image(folders, factors, sf_path)
    row_of = {b: i for i, b in enumerate(barcodes)}
    rows = np.array([row_of[b] for b in positions.index])
    xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * scale
    adata = build_adata(mat[rows], list(positions.index), genes, xy, where=counts_path)
    adata.obs["array_row"] = positions["array_row"].astype(int).to_numpy()
    adata.obs["array_col"] = positions["array_col"].astype(int).to_numpy()
    sid = sample_id or outs.parent.name or outs.name
    sample = Sample(
        sample_id=sid,
        patient_id=patient_id or sid,
        adata=adata,
        pixel_size_um=full_resolution_pixel_um(factors, sf_path) / scale,
        spot_diameter_um=float(factors.get("bin_size_um", VISIUM_SPOT_UM)),
        image_path=image_path,
        technology="visium_hd" if "bin_size_um" in factors else "visium",
        dataset=dataset,
        source={"counts": str(counts_path), "positions": str(pos_path), "scalefactors": str(sf_path)}
        | image_source(image_path),
    )
    sample.validate()
    return sample
