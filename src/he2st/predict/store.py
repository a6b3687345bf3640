"""The files of a whole-slide prediction: the resumable partial file and the scverse AnnData it becomes.

``<name>.partial.h5`` holds the spot centres, every committed chunk's features and predictions, and a
fingerprint of everything that changes the numbers, so an interrupted run resumes where it stopped
and a changed run starts again. :func:`write_h5ad` turns it into one ``.h5ad`` in the scverse layout
(``obsm["spatial"]`` in level-0 px, ``uns["spatial"][library_id]`` with a hires image and scale
factors), so ``squidpy.pl.spatial_scatter`` / ``scanpy.pl.spatial`` work unchanged.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from he2st.data.sample import spatial_library
from he2st.errors import He2stWarning
from he2st.io import atomic_path, make_folder, record_output
from he2st.methods import Method
from he2st.predict.grid import SpotGrid

PARTIAL_FORMAT = 1
#: per-spot flags a method returns as 0/1 (the partial file holds every per-spot value as float32): written as
#: booleans, as scverse selects spots by them -- ``adata[adata.obs["in_distribution"]]`` with a float column
#: indexes rows by position and returns copies of the first two spots
FLAGS = ("in_distribution",)


def file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def fingerprint(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def method_fingerprint(method: Method) -> str:
    """Changes with anything learned or configured: card, options, layout, tensors and bank."""
    h = hashlib.sha1()
    h.update(method.card.model_dump_json(exclude={"created"}).encode())
    h.update(method.config.model_dump_json().encode())
    h.update(json.dumps(method.layout(), sort_keys=True).encode())
    for key, tensor in sorted(method.state().items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    for bank in (method.bank, method.transcriptome_bank):
        if bank is not None:
            h.update(np.ascontiguousarray(bank.embeddings).tobytes())
            h.update(np.ascontiguousarray(bank.expression).tobytes())
            h.update("\0".join(bank.genes).encode())
    return h.hexdigest()


def stored_fingerprint(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as fh:
            value = fh["uns/he2st/fingerprint"][()]
    except (OSError, KeyError):
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def open_partial(path: Path, fingerprint: str, grid: SpotGrid, n_genes: int, dim: int, chunk: int) -> None:
    """Create the partial file, or keep an existing one made with the same fingerprint."""
    if path.exists():
        try:
            with h5py.File(path, "r") as fh:
                if fh.attrs.get("fingerprint") == fingerprint and fh.attrs.get("format") == PARTIAL_FORMAT:
                    return
        except (OSError, KeyError):
            pass
        path.unlink()  # made another way (or unreadable): start again (the caller checked it is he2st's own)
    make_folder(path.parent)
    n, rows = len(grid), max(1, min(chunk, len(grid)))
    record_output(path)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("xy", data=grid.xy)
        fh.create_dataset("features", shape=(n, dim), dtype=np.float32, chunks=(rows, dim))
        fh.create_dataset("expression", shape=(n, n_genes), dtype=np.float32, chunks=(rows, n_genes),
                          fillvalue=np.nan)
        fh.attrs.update({"format": PARTIAL_FORMAT, "fingerprint": fingerprint, "embedded_chunks": 0,
                         "predicted_chunks": 0})


def warn_if_out_of_distribution(path: Path, most: float = 0.5) -> None:
    """One line when most of a prediction's spots are unlike every training patient's images."""
    with h5py.File(path, "r") as fh:
        if "obs" not in fh or "in_distribution" not in fh["obs"]:
            return
        inside = np.asarray(fh["obs"]["in_distribution"][:], np.float64)
    flagged = 1.0 - float(np.nanmean(inside)) if len(inside) else 0.0
    if flagged > most:
        warnings.warn(f"{path}: {flagged:.0%} of the spots are out of distribution for this model (unlike the "
                      "images of its training patients: another tissue, stain, scanner or resolution?); read their "
                      "predictions with obs['in_distribution']", He2stWarning, stacklevel=2)


def write_h5ad(partial: Path, final: Path, grid: SpotGrid, genes: list[str], thumb: np.ndarray, scale: float,
                mpp: float, library_id: str, meta: dict, var_columns: dict[str, np.ndarray] | None = None) -> None:
    """The finished prediction: ``X`` = predictions, per-spot uncertainty in ``obs``, extras (e.g. cell-type
    proportions) in ``obsm``, the hires thumbnail and scale factors in ``uns["spatial"]``."""
    with h5py.File(partial, "r") as fh:
        expression = fh["expression"][:]
        uncertainty = {k: fh[k][:] for k in fh if fh[k].attrs.get("kind") == "uncertainty" and fh[k].ndim == 1}
        extras = {k: fh[k][:] for k in fh if fh[k].attrs.get("kind") == "extra"}
        layers = {k: fh[k][:] for k in fh if fh[k].attrs.get("kind") == "layer"}
    obs = pd.DataFrame(index=pd.Index(grid.names, name="spot"))
    obs["in_tissue"] = grid.in_tissue.astype(np.int64)
    if grid.array_row is not None and grid.array_col is not None:
        obs["array_row"], obs["array_col"] = grid.array_row, grid.array_col
    for key, values in uncertainty.items():
        obs[key] = values > 0.5 if key in FLAGS else values
    var = pd.DataFrame(var_columns or {}, index=pd.Index(genes, name="gene"))
    adata = ad.AnnData(X=expression, obs=obs, var=var, layers=layers)
    adata.obsm["spatial"] = grid.xy.astype(np.float64)
    for key, values in extras.items():  # e.g. predicted cell-type proportions
        adata.obsm[key] = values if values.ndim == 2 else values[:, None]
    library = spatial_library(thumb, scale, grid.spot_diameter_um / mpp, meta["slide"], "he2st predict")
    # readers of scale factors (he2st's own included) take µm/px from microns_per_pixel, else from
    # spot_diameter_fullres as Space Ranger's theoretical 65 µm spot: here that is the spot's true size (drawn so)
    library["scalefactors"]["microns_per_pixel"] = float(mpp)
    adata.uns["spatial"] = {library_id: library}
    adata.uns["he2st"] = meta
    with atomic_path(final, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
