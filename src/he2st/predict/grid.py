"""Where to predict on a new slide: a Visium-like hexagonal grid over the tissue, or a sample's own spots.

Models are trained on spot-level data, so predictions should sit on a spot lattice of the same
kind. Visium places 55 µm spots at a 100 µm centre-to-centre pitch on a hexagonal lattice (rows
pitch·√3/2 apart, every other row shifted by half a pitch), and its ``array_col`` runs over even
numbers on even rows and odd numbers on odd rows. We follow that, so squidpy's
``spatial_neighbors(coord_type="grid", n_neighs=6)`` works on the output unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from he2st.data.sample import Sample
from he2st.errors import He2stError

VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_FRACTION = 0.55  # spot diameter / pitch (55 µm / 100 µm)
# Most lattice points a grid may lay over the tissue's bounding box. Each kept one is a patch to cut and encode,
# so 10 million (a 10 µm pitch over 3 x 3 cm) is already days of prediction and ~0.5 GB only to place them;
# a larger grid is a mistaken pitch, refused in one line rather than found out as an allocation failure.
MAX_GRID_POINTS = 10_000_000


@dataclass
class SpotGrid:
    """Spot centres to predict at, with their names and annotations (row-aligned)."""

    xy: np.ndarray  # (n, 2) float64 centres (x, y) in level-0 px
    names: list[str]
    in_tissue: np.ndarray  # (n,) int 0/1
    spot_diameter_um: float
    pitch_um: float | None = None  # None: irregular (a sample's own spots)
    array_row: np.ndarray | None = None
    array_col: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)


def hex_grid(mask: np.ndarray, scale: float, pitch_um: float = VISIUM_PITCH_UM, mpp: float = 1.0,
             where: str | Path | None = None) -> SpotGrid:
    """Hexagonal spot centres (level-0 px) whose centre falls on tissue.

    ``mask`` is a tissue mask at thumbnail resolution, ``scale`` = mask px per level-0 px,
    ``mpp`` = level-0 µm/px. The lattice is centred on the tissue's bounding box so the result
    does not depend on how much glass surrounds the tissue. A lattice of more than :data:`MAX_GRID_POINTS`
    is refused (naming ``where``) before it is allocated.
    """
    if pitch_um <= 0 or mpp <= 0 or scale <= 0:
        raise He2stError(f"pitch ({pitch_um} µm), pixel size ({mpp} µm/px) and scale ({scale}) must be positive")
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise He2stError("the tissue mask is empty: no spot to predict")
    pitch = pitch_um / mpp
    row_step = pitch * np.sqrt(3) / 2
    x_lo, x_hi = xs.min() / scale, (xs.max() + 1) / scale
    y_lo, y_hi = ys.min() / scale, (ys.max() + 1) / scale
    n_cols = int((x_hi - x_lo) // pitch) + 1
    n_rows = int((y_hi - y_lo) // row_step) + 1
    if n_rows * (n_cols + 1) > MAX_GRID_POINTS:
        raise He2stError(f"a {pitch_um:g} µm spot pitch (--pitch-um) lays {n_rows * (n_cols + 1):,} grid points over "
                         f"the tissue, more than {MAX_GRID_POINTS:,}; choose a coarser pitch (Visium: "
                         f"{VISIUM_PITCH_UM:g} µm)", where)
    x0 = x_lo + ((x_hi - x_lo) - (n_cols - 1) * pitch) / 2 - pitch / 4  # room for the half-pitch shift
    y0 = y_lo + ((y_hi - y_lo) - (n_rows - 1) * row_step) / 2
    rows, cols = np.mgrid[0:n_rows, 0 : n_cols + 1]
    rows, cols = rows.ravel(), cols.ravel()
    x = x0 + cols * pitch + (rows % 2) * pitch / 2
    y = y0 + rows * row_step
    mx, my = np.floor(x * scale).astype(np.int64), np.floor(y * scale).astype(np.int64)
    inside = (mx >= 0) & (my >= 0) & (mx < mask.shape[1]) & (my < mask.shape[0])
    keep = np.zeros(len(x), dtype=bool)
    keep[inside] = mask[my[inside], mx[inside]]
    rows, cols = rows[keep], cols[keep]
    array_col = 2 * cols + rows % 2
    return SpotGrid(
        xy=np.stack([x[keep], y[keep]], axis=1).astype(np.float64),
        names=[f"r{r}_c{c}" for r, c in zip(rows, array_col, strict=True)],
        in_tissue=np.ones(int(keep.sum()), dtype=np.int64),
        spot_diameter_um=pitch_um * VISIUM_SPOT_FRACTION,
        pitch_um=pitch_um,
        array_row=rows.astype(np.int64),
        array_col=array_col.astype(np.int64),
    )


def check_pitch(pitch_um: float, mpp: float, where: str | Path | None = None) -> None:
    """Refuse a spot pitch under one pixel of a slide of ``mpp`` µm/px: neighbouring spots would share their
    pixels (and the lattice would outgrow memory), which no prediction needs -- it is a mistyped pitch."""
    if pitch_um < mpp:
        raise He2stError(f"a {pitch_um:g} µm spot pitch (--pitch-um) is under one pixel of this slide ({mpp:g} "
                         f"µm/px); choose a pitch of at least {mpp:g} µm (Visium: {VISIUM_PITCH_UM:g} µm)", where)


def grid_from_sample(sample: Sample) -> SpotGrid:
    """The measured spots of a sample (e.g. to compare predictions with its expression spot by spot)."""
    obs = sample.adata.obs
    n = sample.n_spots

    def column(name: str) -> np.ndarray | None:
        values = obs[name].to_numpy() if name in obs else None
        ok = values is not None and np.issubdtype(values.dtype, np.number) and np.isfinite(values).all()
        return values.astype(np.int64) if ok else None

    in_tissue = column("in_tissue")
    return SpotGrid(
        xy=sample.spatial.copy(), names=[str(b) for b in sample.adata.obs_names],
        in_tissue=in_tissue if in_tissue is not None else np.ones(n, dtype=np.int64),
        spot_diameter_um=float(sample.spot_diameter_um), pitch_um=None,
        array_row=column("array_row"), array_col=column("array_col"),
    )
