"""Legacy Spatial Transcriptomics (the 1k and 2k arrays) in the her2st layout: a counts table and a spot file.

The pixel size is not stored anywhere: it comes from the spot lattice (pixels per array step against the
array's µm per step), so the reader first tells the 1k array from the 2k one by the lattice's parity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from he2st.data.readers.base import SourceOptions, image_source, join_barcodes, register_reader, require
from he2st.data.sample import Sample, build_adata
from he2st.errors import He2stError

ST_PITCH_UM = 200.0  # legacy ST 1k array: spots 100 µm across, 200 µm centre to centre per array step
ST_2K_PITCH_UM = 100.0  # 2k array: 100 µm per array step, spots on a checkerboard (141 µm diagonal spacing)
ST_SPOT_UM = 100.0


@register_reader("st")
class StSource(SourceOptions):
    """Legacy ST: ``path`` is the spots x genes counts table, ``spots_file`` the ``*_selection.tsv``."""

    spots_file: Path = Field(description="the *_selection.tsv spot file (x, y, pixel_x, pixel_y, selected)")
    pitch_um: float | None = Field(
        None, gt=0, description="µm per array step (default: detected from the spot lattice, 200 for the "
        "1k array, 100 for the 2k array)")

    def read(self) -> Sample:
        return read_st(self.path, self.spots_file, self.image, self.sample_id, self.patient_id or self.sample_id,
                       pitch_um=self.pitch_um, pixel_size_um=self.pixel_size_um)


def read_counts_table(path: str | Path) -> pd.DataFrame:
    """Spots x genes table (TSV/CSV, optionally gzipped) of numbers; the counts' values are checked where
    every reader's are (:func:`~he2st.data.sample.build_adata`)."""
    path = require(Path(path), "counts file")
    sep = "," if ".csv" in path.name else "\t"
    try:
        table = pd.read_csv(path, sep=sep, index_col=0)
    except (EOFError, OSError, ValueError, UnicodeDecodeError) as exc:  # EmptyDataError/ParserError are ValueErrors
        raise He2stError(f"cannot parse counts table ({type(exc).__name__}: {exc})", path) from exc
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise He2stError("counts table is empty", path)
    bad = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if bad:
        col = bad[0]
        value = table[col][pd.to_numeric(table[col], errors="coerce").isna()].iloc[0]
        raise He2stError(f"non-numeric count {value!r} in gene column {col!r}", path)
    table.columns = _gene_names(path, sep, table.shape[1])
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        raise He2stError(f"duplicate spot barcode {table.index[table.index.duplicated()][0]!r}", path)
    return table


def _gene_names(path: Path, sep: str, n_genes: int) -> list[str]:
    """The gene names as the header line spells them: pandas renames a repeated column G to G.1, and the
    names are kept so that duplicates are seen (:func:`~he2st.data.sample.build_adata`). A header with a
    field above the row names (pandas, R's ``write.csv``) has one name more than there are genes; one
    without (R's ``write.table``) has one per gene, and its first name is a gene's."""
    names = pd.read_csv(path, sep=sep, header=None, nrows=1).iloc[0].astype(str).to_list()
    return names[1:] if len(names) == n_genes + 1 else names


def pixel_size_from_grid(array_xy: np.ndarray, pixel_xy: np.ndarray, pitch_um: float) -> float:
    """µm/px from how many pixels one array step spans (least squares over all spots)."""
    slopes = []
    for axis in (0, 1):
        if np.ptp(array_xy[:, axis]) == 0:
            continue
        slope = np.polyfit(array_xy[:, axis], pixel_xy[:, axis], 1)[0]
        slopes.append(abs(slope))
    if not slopes or min(slopes) == 0:
        raise He2stError("cannot derive pixel size: spots do not span the array grid")
    return pitch_um / float(np.mean(slopes))


def st_array_pitch(array_xy: np.ndarray) -> float:
    """µm per array step of a legacy ST array, from its spot lattice. The 2k array adds a spot at the
    centre of each square of the 1k array and numbers the positions in half steps, so its spots occupy
    a checkerboard (x + y of one parity); the 1k array's occupy both parities."""
    parity = (np.rint(array_xy).astype(np.int64).sum(axis=1)) % 2
    if len(parity) >= 10 and (parity == parity[0]).all():
        return ST_2K_PITCH_UM
    return ST_PITCH_UM


def read_st(
    counts_file: str | Path,
    spots_file: str | Path,
    image: str | Path | None,
    sample_id: str,
    patient_id: str,
    image_scale: float = 1.0,
    pitch_um: float | None = None,
    spot_diameter_um: float = ST_SPOT_UM,
    dataset: str | None = None,
    pixel_size_um: float | None = None,
) -> Sample:
    """Legacy Spatial Transcriptomics in the her2st layout.

    ``counts_file``: spots x genes TSV with ``"<x>x<y>"`` spot ids; ``spots_file``: the
    ``*_selection.tsv`` with ``x y new_x new_y pixel_x pixel_y selected``. ``image_scale`` maps the
    spot file's pixel coordinates onto ``image`` (1 for the full-resolution image). Only spots with
    ``selected == 1`` (under tissue) are kept. The pixel size comes from the spot grid: pixels per
    array step against ``pitch_um`` µm per step, which is detected from the lattice (1k or 2k array,
    :func:`st_array_pitch`) unless given; ``pixel_size_um`` overrides the derived value.
    """
    counts_file, spots_file = Path(counts_file), require(Path(spots_file), "spot file")
    table = read_counts_table(counts_file)
    try:
        spots = pd.read_csv(spots_file, sep="\t")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise He2stError(f"cannot parse spot file ({type(exc).__name__}: {exc})", spots_file) from exc
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need.issubset(spots.columns):
        raise He2stError(f"spot file lacks columns {sorted(need - set(spots.columns))}", spots_file)
    if spots[sorted(need)].isna().any().any() or not all(pd.api.types.is_numeric_dtype(spots[c]) for c in need):
        raise He2stError("spot file has missing or non-numeric x/y/pixel_x/pixel_y values", spots_file)
    spots.index = pd.Index(spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str))
    if spots.index.has_duplicates:
        raise He2stError(f"duplicate spot {spots.index[spots.index.duplicated()][0]!r}", spots_file)
    common = join_barcodes(table.index, spots.index, counts_file, spots_file)
    spots = spots.loc[common]
    if "selected" in spots.columns:
        spots = spots[spots["selected"].astype(int) == 1]
    if len(spots) == 0:
        raise He2stError("no spot left after keeping spots under tissue (selected == 1)", spots_file)
    grid_cols = ["new_x", "new_y"] if {"new_x", "new_y"}.issubset(spots.columns) else ["x", "y"]
    pixel = spots[["pixel_x", "pixel_y"]].to_numpy(float) * image_scale
    if pitch_um is None:
        pitch_um = st_array_pitch(spots[["x", "y"]].to_numpy(float))
    try:
        um_per_px = pixel_size_um or pixel_size_from_grid(spots[grid_cols].to_numpy(float), pixel, pitch_um)
    except He2stError as exc:
        raise He2stError(exc.problem, spots_file) from exc
    adata = build_adata(table.loc[spots.index].to_numpy(), list(spots.index), list(table.columns), pixel,
                        where=counts_file)
    adata.obs["array_col"] = spots["x"].astype(int).to_numpy()
    adata.obs["array_row"] = spots["y"].astype(int).to_numpy()
    sample = Sample(
        sample_id=sample_id,
        patient_id=patient_id,
        adata=adata,
        pixel_size_um=um_per_px,
        spot_diameter_um=spot_diameter_um,
        image_path=None if image is None else Path(image),
        technology="st",
        dataset=dataset,
        source={"counts": str(counts_file), "positions": str(spots_file)} | image_source(image),
    )
    sample.validate()
    return sample
