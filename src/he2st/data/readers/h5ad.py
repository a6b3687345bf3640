"""Any AnnData ``.h5ad`` with raw counts in ``X`` and spot centres in ``obsm['spatial']`` (scverse convention).

Such a file does not know its image's pixel size, so the source must give ``pixel_size_um``. Files keyed by
Ensembl ids (CELLxGENE's schema, many portal exports) name their genes by symbol in a ``var`` column; he2st's
signatures, markers and the genes a user asks for are symbols, so that column names the genes.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from he2st.data.readers.base import SourceOptions, image_source, register_reader, require
from he2st.data.sample import VISIUM_SPOT_UM, Sample, build_adata
from he2st.data.sample_header import id_from_file
from he2st.errors import He2stError

#: ``var`` columns holding gene symbols, looked for in this order when the genes are keyed by Ensembl ids:
#: CELLxGENE's schema, scanpy's ``read_10x_*`` and common spellings
SYMBOL_COLUMNS: tuple[str, ...] = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol")
#: an Ensembl gene id of any species (ENSG, ENSMUSG, ...), with or without its version
_ENSEMBL_ID = re.compile(r"ENS[A-Z]*G\d{6,}(\.\d+)?")


@register_reader("h5ad")
class H5adSource(SourceOptions):
    """A ``.h5ad`` (``path``) and the image its ``obsm['spatial']`` is in (``image``)."""

    pixel_size_um: float = Field(gt=0, description="µm/px of the image (an .h5ad does not record it)")
    gene_names: str = Field(
        "auto", description="var column naming the genes; 'auto': a symbol column when var_names are Ensembl ids; "
        "'index': var_names")

    def read(self) -> Sample:
        return read_h5ad_sample(self.path, self.image, self.pixel_size_um, self.sample_id, self.patient_id,
                                gene_names=self.gene_names)


def read_h5ad_sample(
    path: str | Path,
    image: str | Path | None,
    pixel_size_um: float,
    sample_id: str | None = None,
    patient_id: str | None = None,
    spot_diameter_um: float = VISIUM_SPOT_UM,
    technology: str = "h5ad",
    dataset: str | None = None,
    gene_names: str = "auto",
) -> Sample:
    """Any AnnData with raw counts in ``layers['counts']`` (where scverse keeps them once ``X`` is normalised),
    else in ``X``, and spot centres (x, y) in ``obsm['spatial']``. Without
    ``sample_id``, the sample is named by the file's own library id (the one key of ``uns['spatial']``, the
    scverse convention), else by the file's stem. The file's spot annotations (``obs`` columns) are kept, a
    ``barcode`` column that differs from the spot ids as ``barcode_original`` (:func:`_kept_annotations`).
    ``gene_names``: the ``var`` column naming the genes (:func:`gene_names_of`); the ids it replaces are kept
    in ``var['gene_ids']``."""
    path = require(Path(path), "AnnData file")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # corrupt/truncated files raise many exception types
        raise He2stError(f"not a readable .h5ad file ({type(exc).__name__}: {exc})", path) from exc
    if "spatial" not in adata.obsm:
        raise He2stError("AnnData has no obsm['spatial'] spot coordinates", path)
    if adata.obs_names.has_duplicates:
        raise He2stError(f"duplicate spot barcode {adata.obs_names[adata.obs_names.duplicated()][0]!r}", path)
    if "in_tissue" in adata.obs:
        missing = int(adata.obs["in_tissue"].isna().sum())
        if missing:  # neither under tissue nor off it: a partly filled column, not a choice to make silently
            raise He2stError(f"obs['in_tissue'] has {missing} missing value(s); give every spot 1 (under tissue) or 0",
                             path)
        adata = adata[adata.obs["in_tissue"].astype(int) == 1].copy()
    if adata.n_obs == 0:
        raise He2stError("no spot left after keeping spots under tissue (in_tissue == 1)", path)
    where = "layers['counts']" if "counts" in adata.layers else "X"
    X = adata.layers.get("counts", adata.X)
    if not np.issubdtype((X.data if sp.issparse(X) else np.asarray(X)).dtype, np.number):
        raise He2stError(f"{where} must hold raw counts (numbers)", path)
    names = gene_names_of(adata.var, gene_names, path)
    built = build_adata(X, list(adata.obs_names), names, np.asarray(adata.obsm["spatial"])[:, :2], where=path)
    if names != list(adata.var_names.astype(str)):
        built.var["gene_ids"] = adata.var_names.astype(str).to_numpy()
    for col, values in _kept_annotations(adata.obs, str(built.obs.index.name)).items():
        built.obs[col] = values
    sid = sample_id or _own_library_id(adata, path) or path.stem
    sample = Sample(
        sample_id=sid,
        patient_id=patient_id or sid,
        adata=built,
        pixel_size_um=float(pixel_size_um),
        spot_diameter_um=float(spot_diameter_um),
        image_path=None if image is None else Path(image),
        technology=technology,
        dataset=dataset,
        source={"counts": str(path)} | image_source(image),
    )
    sample.validate()
    return sample


def gene_names_of(var: pd.DataFrame, column: str, path: Path) -> list[str]:
    """The genes' names: the ``var`` column ``column`` (``'index'``: ``var_names``). ``'auto'`` takes the first
    of :data:`SYMBOL_COLUMNS` present when most ``var_names`` are Ensembl ids, else ``var_names``. A gene whose
    symbol is missing or empty keeps its ``var_names`` entry; a symbol shared by several ids is made unique
    as any duplicate name is (:func:`~he2st.data.sample.build_adata`)."""
    ids = var.index.astype(str)
    if column == "index":
        return list(ids)
    if column == "auto":
        ensembl = np.mean([_ENSEMBL_ID.fullmatch(name) is not None for name in ids]) > 0.5 if len(ids) else False
        column = next((c for c in SYMBOL_COLUMNS if c in var.columns), "index") if ensembl else "index"
        if column == "index":
            return list(ids)
    if column not in var.columns:
        raise He2stError(f"gene_names: var has no column {column!r} (columns: {', '.join(map(str, var.columns)) or 'none'}"
                         "; 'index' names the genes by var_names)", path)
    symbols = var[column].astype("string").str.strip()
    missing = symbols.isna() | (symbols == "")
    return [i if gone else str(s) for i, s, gone in zip(ids, symbols.fillna(""), missing, strict=True)]


def _kept_annotations(obs: pd.DataFrame, index_name: str) -> dict[str, np.ndarray | pd.api.extensions.ExtensionArray]:
    """The columns of ``obs`` by the names a sample keeps them under, each with its own dtype: a categorical
    stays categorical, and a nullable column (``boolean``, ``Int64``, ``string``) stays nullable -- as a
    NumPy array its missing values become ``pd.NA`` in an object column, which ``.h5ad`` cannot store. The
    spot ids (``obs_names``) are the sample's index, named ``index_name`` (``barcode``:
    :func:`~he2st.data.sample.build_adata`); a column of that name holding other values (exported Visium files
    often keep the 10x barcodes there beside other spot ids) cannot sit beside it in a saved ``.h5ad``, so it
    is kept, unchanged, as ``<name>_original``."""
    kept: dict[str, np.ndarray | pd.api.extensions.ExtensionArray] = {}
    for col in obs.columns:
        name = col
        if col == index_name and not (obs[col].astype(str).to_numpy() == obs.index.astype(str)).all():
            while name in obs.columns:
                name = f"{name}_original"
        values = obs[col]
        kept[name] = values.array if isinstance(values.dtype, pd.api.extensions.ExtensionDtype) else values.to_numpy()
    return kept


def _own_library_id(adata: ad.AnnData, path: Path) -> str | None:
    """The one library id of ``uns['spatial']`` (checked: it names output files), or None."""
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict) or len(libraries) != 1:
        return None
    return id_from_file(next(iter(libraries)), "library id in uns['spatial']", path)
