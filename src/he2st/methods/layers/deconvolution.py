"""Cell-type proportions of spots from a user's single-cell reference, by Tangram (Biancalani et al.,
Nature Methods 2021; ``tangram-sc``, he2st's ``deconvolution`` extra) in its cluster mode.

CarHE's third modality needs per-spot cell-type proportions, and most data carry none. Tangram maps each
reference type's summed expression onto the training spots, on the panel genes the reference also
measures; a spot's proportions are its column of the mapping normalised to sum to 1 (as Tangram's
``project_cell_annotations`` reads it), so the reference's own type shares are not taken for the
tissue's. Both sides are linear (cells scaled to 10^4 counts, targets turned back with ``expm1``), and
every spot gets Tangram's uniform density prior. docs/methods/carhe.md has the details.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from he2st.errors import He2stError
from he2st.io import sha256_file

__all__ = ["Deconvolution", "read_reference", "tangram_proportions"]

MIN_SHARED_GENES = 10
CELL_TOTAL = 1e4


@dataclass
class Deconvolution:
    """Per-spot proportions ``(N, C)`` (rows sum to 1), their types, and what the model card records."""

    proportions: np.ndarray
    types: list[str]
    record: dict[str, Any]


def read_reference(path: str | Path, key: str) -> tuple[ad.AnnData, pd.Series]:
    """The reference's counts (``layers["counts"]`` when present, else ``X``) and its cell-type column;
    one error line naming the file when it cannot be read or lacks what deconvolution needs."""
    path = Path(path)
    try:
        reference = ad.read_h5ad(path)
    except (OSError, ValueError, KeyError) as exc:
        raise He2stError(f"cannot read the single-cell reference ({type(exc).__name__}: {exc})", path) from exc
    if key not in reference.obs:
        raise He2stError(f"the single-cell reference has no obs column {key!r} (cell types); it has "
                         f"{list(reference.obs.columns)[:12]}", path)
    labels = reference.obs[key]
    if labels.isna().any():
        reference, labels = reference[labels.notna().to_numpy()], labels[labels.notna()]
    if labels.nunique() < 2:
        raise He2stError(f"the single-cell reference's column {key!r} names fewer than 2 cell types", path)
    counts = reference.layers.get("counts", reference.X)
    minimum = counts.min() if counts.size else 0
    if minimum < 0:
        raise He2stError("the single-cell reference holds negative values; give counts per cell "
                         "(X or layers['counts'])", path)
    cells = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), obs=pd.DataFrame(index=reference.obs_names),
                       var=pd.DataFrame(index=reference.var_names))
    return cells, labels.astype(str)


def _tangram():
    """The tangram module, imported quietly (it sets the root logger to INFO on import)."""
    root = logging.getLogger()
    level = root.level
    try:
        with warnings.catch_warnings():  # its scipy/pandas deprecations are not the user's to act on
            warnings.simplefilter("ignore", DeprecationWarning)
            import tangram
    except ImportError as exc:
        raise He2stError("cell types from a single-cell reference need Tangram: pip install 'he2st[deconvolution]'") \
            from exc
    finally:
        root.setLevel(level)
    return tangram


def tangram_proportions(
    path: str | Path, key: str, targets: np.ndarray, genes: list[str], seed: int = 0, epochs: int = 500
) -> Deconvolution:
    """Proportions of the reference's cell types in each spot (``targets``: the training spots' panel
    targets, log1p of normalised counts), by Tangram's cluster mode on the shared genes (case-insensitive)."""
    cells, labels = read_reference(path, key)
    panel = pd.Index([g.upper() for g in genes])
    names = pd.Index([str(g).upper() for g in cells.var_names])
    shared = [g for g in dict.fromkeys(panel.intersection(names[~names.duplicated(keep=False)]))
              if (panel == g).sum() == 1]
    if len(shared) < MIN_SHARED_GENES:
        raise He2stError(f"the single-cell reference measures {len(shared)} of the panel's genes; deconvolution "
                         f"needs at least {MIN_SHARED_GENES}", path)
    totals = np.asarray(cells.X.sum(axis=1)).ravel()
    scaled = sp.diags(np.divide(CELL_TOTAL, totals, out=np.zeros_like(totals), where=totals > 0)) @ cells.X
    columns = pd.Series(np.arange(len(names)), index=names)
    reference = ad.AnnData(sp.csr_matrix(scaled[:, columns[shared].to_numpy()]),
                           obs=pd.DataFrame({key: labels.to_numpy()}, index=cells.obs_names.astype(str)),
                           var=pd.DataFrame(index=shared))
    values = np.expm1(np.asarray(targets, np.float32)[:, panel.get_indexer(shared)])
    spots = ad.AnnData(values, obs=pd.DataFrame(index=np.arange(len(values)).astype(str)),
                       var=pd.DataFrame(index=shared))
    tg = _tangram()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # tangram prints its progress
        warnings.simplefilter("ignore", FutureWarning)  # pandas deprecations inside tangram
        warnings.simplefilter("ignore", ad.ImplicitModificationWarning)  # its cluster table's integer index
        tg.pp_adatas(reference, spots, genes=None, gene_to_lowercase=False)
        mapping = tg.map_cells_to_space(reference, spots, mode="clusters", cluster_label=key, device="cpu",
                                        num_epochs=epochs, density_prior="uniform", random_state=seed + 1,
                                        verbose=False)
    types = [str(t) for t in mapping.obs[key]]
    per_spot = np.asarray(mapping.X, np.float64).T  # (spots, types)
    order = np.argsort(types)
    total = per_spot.sum(axis=1, keepdims=True)
    props = np.divide(per_spot, total, out=np.zeros_like(per_spot), where=total > 0)[:, order]
    record = {"method": f"tangram {tg.__version__} (mode=clusters, {epochs} epochs, uniform density, cpu)",
              "reference": str(Path(path).resolve()), "reference_sha256": sha256_file(path), "celltype_key": key,
              "types": [types[i] for i in order], "n_cells": int(cells.n_obs), "n_spots": len(targets),
              "genes": sorted(spots.uns["training_genes"])}
    return Deconvolution(props.astype(np.float32), record["types"], record)
