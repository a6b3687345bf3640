"""A prediction as a SpatialData store (``he2st predict --format zarr``), where scverse is going.

Everything is placed in one coordinate system, ``um`` (micrometres on the slide), so it overlays any
other element of the section a user brings:

* ``images/he``: the slide's hires view as a multiscale pyramid, scaled to µm; the full slide stays
  where it is and is named in the table's ``uns["he2st"]["slide"]`` (copying gigapixels is not needed
  to look at predictions);
* ``shapes/spots``: one circle per spot at its centre, with the spot's radius, in µm;
* ``tables/table``: the prediction AnnData (``X`` = predicted expression, uncertainty in ``obs``),
  annotating ``spots`` by ``spot_id``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from he2st.errors import He2stError

COORDINATES = "um"


def write_spatialdata(prediction: Path, store: Path) -> Path:
    """Write the finished ``prediction`` (.h5ad) as the SpatialData store ``store`` (replaced atomically)."""
    try:
        import spatialdata
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Scale
    except ImportError as exc:
        raise He2stError("--format zarr needs spatialdata: pip install 'he2st[spatialdata]'") from exc
    adata = ad.read_h5ad(prediction)
    meta = adata.uns["he2st"]
    library = next(iter(adata.uns["spatial"].values()))
    mpp = float(meta["mpp"])
    hires = np.moveaxis(np.asarray(library["images"]["hires"]), -1, 0)  # (c, y, x)
    to_um = mpp / float(library["scalefactors"]["tissue_hires_scalef"])  # hires px -> level-0 px -> µm
    levels = [2] * int(max(0, np.floor(np.log2(max(hires.shape[1:]) / 256))))  # down to ~256 px
    image = Image2DModel.parse(hires, dims=("c", "y", "x"), scale_factors=levels or None,
                               transformations={COORDINATES: Scale([to_um, to_um], axes=("y", "x"))})
    centres = pd.DataFrame(adata.obsm["spatial"] * mpp, columns=["x", "y"])
    radius = float(library["scalefactors"]["spot_diameter_fullres"]) * mpp / 2
    spots = ShapesModel.parse(centres[["x", "y"]].to_numpy(), geometry=0, radius=np.full(len(centres), radius),
                              index=pd.Index(np.arange(len(centres)), name="spot_id"),
                              transformations={COORDINATES: Scale([1.0, 1.0], axes=("x", "y"))})
    table = adata.copy()
    del table.uns["spatial"]  # the image lives in images/he
    table.obs["region"] = pd.Categorical(["spots"] * table.n_obs)
    table.obs["spot_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    sdata = spatialdata.SpatialData(images={"he": image}, shapes={"spots": spots}, tables={"table": table})
    partial = store.with_name(f".{store.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    sdata.write(partial)
    shutil.rmtree(store, ignore_errors=True)
    partial.rename(store)
    return store
