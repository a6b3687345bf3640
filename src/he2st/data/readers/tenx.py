"""10x Genomics feature-barcode matrices (Space Ranger, Xenium): the HDF5 file and the Matrix Market trio.

Both keep only ``Gene Expression`` features (antibody or probe-control rows are not genes) and return
``(spots x genes counts, barcodes, gene names)``.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp

from he2st.data.readers.base import open_text
from he2st.errors import He2stError

Matrix = tuple[sp.csr_matrix, list[str], list[str]]


def read_10x_h5(path: Path) -> Matrix:
    """A ``*feature_bc_matrix.h5`` (or its ``.h5.gz``, read in memory: HDF5 cannot seek in a gzip stream)."""
    try:
        source: Path | io.BytesIO = path
        if path.suffix == ".gz":
            with gzip.open(path) as packed:
                source = io.BytesIO(packed.read())
        with h5py.File(source, "r") as fh:
            grp = fh["matrix"]
            n_genes, n_barcodes = (int(v) for v in grp["shape"][:])
            mat = sp.csc_matrix(
                (grp["data"][:], grp["indices"][:], grp["indptr"][:]), shape=(n_genes, n_barcodes)
            )
            barcodes = [b.decode() for b in grp["barcodes"][:]]
            feats = grp["features"]
            names = [b.decode() for b in feats["name"][:]]
            types = [b.decode() for b in feats["feature_type"][:]] if "feature_type" in feats else None
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise He2stError(f"not a 10x feature-barcode HDF5 matrix ({type(exc).__name__}: {exc})", path) from exc
    keep = np.arange(len(names)) if types is None else np.flatnonzero(np.array(types) == "Gene Expression")
    return mat.T.tocsr()[:, keep], barcodes, [names[i] for i in keep]


def read_10x_mtx(matrix: Path, barcodes_file: Path, features_file: Path) -> Matrix:
    """``matrix.mtx`` (features x barcodes) with its ``barcodes.tsv`` and ``features.tsv``, each maybe gzipped."""
    try:
        with open_text(matrix) as fh:
            mat = sp.csr_matrix(scipy.io.mmread(fh).T)
        with open_text(barcodes_file) as fh:
            barcodes = [line.strip() for line in fh if line.strip()]
        with open_text(features_file) as fh:
            rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except (OSError, ValueError, EOFError) as exc:
        raise He2stError(f"cannot read 10x matrix ({exc})", matrix) from exc
    if mat.shape != (len(barcodes), len(rows)):
        raise He2stError(
            f"matrix is {mat.shape[1]} features x {mat.shape[0]} barcodes but {barcodes_file.name} and "
            f"{features_file.name} list {len(barcodes)} barcodes and {len(rows)} features", matrix)
    keep = [i for i, r in enumerate(rows) if len(r) < 3 or r[2] == "Gene Expression"]
    return mat[:, keep], barcodes, [rows[i][1] if len(rows[i]) > 1 else rows[i][0] for i in keep]
