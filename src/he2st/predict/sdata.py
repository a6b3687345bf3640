"""A prediction as a SpatialData store (``he2st predict --format zarr``), where scverse is going.

Everything is placed in one coordinate system, ``um`` (micrometres on the slide), so it overlays any
other element of the section a user brings:

* ``images/he``: the H&E as a multiscale pyramid, scaled to µm. By default (``zarr_image="hires"``)
  the slide's 2,000 px hires view, with the full slide left where it is and named in the table's
  ``uns["he2st"]["slide"]`` (copying gigapixels is not needed to look at predictions); with
  ``zarr_image="full"`` the whole slide at full resolution, read tile by tile through the slide reader
  (openslide or tifffile) into dask, so no whole-slide array is held in memory (plain JPEG/PNG images
  have no tiles: they are decoded whole, as for prediction);
* ``shapes/spots``: one circle per spot at its centre, with the spot's radius, in µm;
* ``tables/table``: the prediction AnnData (``X`` = predicted expression, uncertainty in ``obs``),
  annotating ``spots`` by ``spot_id``; ``uns["he2st"]["zarr_image"]`` says which image the store holds.
"""

from __future__ import annotations

import contextlib
import math
import uuid
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from he2st.data.slide import Slide, open_slide
from he2st.errors import He2stError
from he2st.io import atomic_folder, output_lock

COORDINATES = "um"
TILE_PX = 2048  # dask chunk (and zarr chunk) side of the full-resolution image
SMALLEST_LEVEL_PX = 256  # the pyramid is halved until its long side is about this


def write_spatialdata(prediction: Path, store: Path, image: str = "hires") -> Path:
    """Write the finished ``prediction`` (.h5ad) as the SpatialData store ``store`` (replaced atomically, and
    only when it is he2st's own or ``--overwrite`` allows it: :func:`he2st.io.atomic_folder`); ``image`` is
    ``"hires"`` (the 2,000 px view) or ``"full"`` (the slide at full resolution)."""
    try:
        import spatialdata
        from spatialdata.models import ShapesModel, TableModel
        from spatialdata.transformations import Scale
    except ImportError as exc:
        raise He2stError("--format zarr needs spatialdata: pip install 'he2st[spatialdata]'") from exc
    adata = ad.read_h5ad(prediction)
    meta = adata.uns["he2st"]
    library = next(iter(adata.uns["spatial"].values()))
    mpp = float(meta["mpp"])
    centres = pd.DataFrame(adata.obsm["spatial"] * mpp, columns=["x", "y"])
    radius = float(library["scalefactors"]["spot_diameter_fullres"]) * mpp / 2
    spots = ShapesModel.parse(centres[["x", "y"]].to_numpy(), geometry=0, radius=np.full(len(centres), radius),
                              index=pd.Index(np.arange(len(centres)), name="spot_id"),
                              transformations={COORDINATES: Scale([1.0, 1.0], axes=("x", "y"))})
    table = adata.copy()
    del table.uns["spatial"]  # the image lives in images/he
    table.uns["he2st"]["zarr_image"] = image
    table.obs["region"] = pd.Categorical(["spots"] * table.n_obs)
    table.obs["spot_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    with contextlib.ExitStack() as stack:
        stack.enter_context(output_lock(store))
        partial = stack.enter_context(atomic_folder(store))
        if image == "full":
            slide = stack.enter_context(open_slide(meta["slide"]))  # open while the tiles are read and written
            he = slide_pyramid(slide, mpp)
        else:
            hires = np.moveaxis(np.asarray(library["images"]["hires"]), -1, 0)  # (c, y, x)
            he = _pyramid(hires, mpp / float(library["scalefactors"]["tissue_hires_scalef"]))  # hires px -> µm
        sdata = spatialdata.SpatialData(images={"he": he}, shapes={"spots": spots}, tables={"table": table})
        with warnings.catch_warnings():  # zarr's notes on its own future defaults are not the user's concern
            warnings.filterwarnings("ignore", "zarr v3 autosharding", UserWarning)
            sdata.write(partial)
    return store


def store_is_current(store: Path, prediction: Path, image: str) -> bool:
    """Whether ``store`` was written from ``prediction`` as it is now, holding the ``image`` asked for."""
    if not store.exists() or store.stat().st_mtime < prediction.stat().st_mtime:
        return False
    try:
        import zarr

        held = zarr.open_group(str(store / "tables" / "table" / "uns" / "he2st"), mode="r")["zarr_image"][()]
    except Exception:  # noqa: BLE001 - an older or broken store: write it again
        return False
    return str(held.item() if hasattr(held, "item") else held) == image


def _pyramid(cyx, um_per_px: float, n_levels: int | None = None):
    """A multiscale image in µm, halved level by level (``n_levels`` times, default: down to about
    ``SMALLEST_LEVEL_PX``)."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    if n_levels is None:
        n_levels = int(max(0, math.floor(math.log2(max(cyx.shape[1:]) / SMALLEST_LEVEL_PX))))
    return Image2DModel.parse(cyx, dims=("c", "y", "x"), scale_factors=[2] * n_levels or None,
                              chunks=(3, TILE_PX, TILE_PX),
                              transformations={COORDINATES: Scale([um_per_px, um_per_px], axes=("y", "x"))})


def slide_pyramid(slide: Slide, mpp: float):
    """The whole slide at full resolution as a multiscale image in µm, every level read lazily from the slide.

    Level ``k`` (``2**k`` downsampled) is read block by block from the slide's own pyramid level nearest
    below it and shrunk by at most 2x, so no level waits on another and only the blocks being written
    are in memory (a pyramid coarsened from level 0 in one dask graph held about the whole level 0).
    Levels stop at about ``SMALLEST_LEVEL_PX`` or where the slide has no level within 2x: a slide
    without a pyramid gets two levels (convert it to a pyramidal TIFF for more)."""
    n_levels = 0
    while (max(slide.dimensions) / 2 ** (n_levels + 1) >= SMALLEST_LEVEL_PX
           and 2 ** (n_levels + 1) / slide.level_downsamples[slide.best_level(2 ** (n_levels + 1))] <= 2):
        n_levels += 1
    tree = _pyramid(lazy_level(slide, 1), mpp, n_levels)
    for k in range(1, n_levels + 1):  # coarsened graphs replaced by independent reads of the same shape
        node = tree[f"scale{k}"]
        node["image"] = node["image"].copy(data=lazy_level(slide, 2**k, node["image"].shape[1:]))
    return tree


class _SlideLevel:
    """The slide ``factor`` times downsampled, as an array-like that dask slices: each block is one
    ``read_region`` at the slide's level nearest below ``factor``, resized by area averaging."""

    def __init__(self, slide: Slide, factor: int, shape_yx: tuple[int, int]) -> None:
        self.slide, self.factor = slide, factor
        self.level = slide.best_level(factor)
        self.ratio = factor / slide.level_downsamples[self.level]  # slide-level px per output px
        self.shape = (3, *shape_yx)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        c, ys, xs = index
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        width, height = max(1, round((x1 - x0) * self.ratio)), max(1, round((y1 - y0) * self.ratio))
        region = self.slide.read_region(x0 * self.factor, y0 * self.factor, self.level, width, height)
        if (width, height) != (x1 - x0, y1 - y0):
            region = np.asarray(Image.fromarray(region).resize((x1 - x0, y1 - y0), Image.Resampling.BOX))
        return np.moveaxis(region, -1, 0)[c]


def lazy_level(slide: Slide, factor: int = 1, shape_yx: tuple[int, int] | None = None):
    """The slide ``factor`` times downsampled (``shape_yx``, default the level-0 size // factor) as a lazy dask
    array (c, y, x), one read per ``TILE_PX`` x ``TILE_PX`` block."""
    import dask.array as da

    width, height = slide.dimensions
    level = _SlideLevel(slide, factor, shape_yx or (height // factor, width // factor))
    return da.from_array(level, chunks=(3, TILE_PX, TILE_PX), asarray=False, fancy=False, lock=False,
                         name=f"he2st-slide-{uuid.uuid4().hex}")  # never mistaken for another slide's blocks
