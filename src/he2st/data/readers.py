"""Readers that turn each technology's files into a :class:`~he2st.data.sample.Sample`.

One function per layout: legacy ST (her2st style), 10x Space Ranger ``outs/`` (Visium, CytAssist,
Visium HD bins), a HEST-1k sample, and any ``.h5ad`` with spot coordinates. They all end in the same
place -- counts AnnData with ``obsm['spatial']`` in level-0 pixels of the image -- and they all
refuse bad input with one line that names the file.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from he2st.data.sample import Sample, build_adata, id_from_file
from he2st.errors import He2stError
from he2st.io import safe_name

ST_PITCH_UM = 200.0  # legacy ST 1k array: spots 100 µm across, 200 µm centre to centre per array step
ST_2K_PITCH_UM = 100.0  # 2k array: 100 µm per array step, spots on a checkerboard (141 µm diagonal spacing)
ST_SPOT_UM = 100.0
VISIUM_SPOT_UM = 55.0


# ---------------------------------------------------------------------------- shared helpers
def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise He2stError(f"{what} not found", path)
    return path


def read_counts_table(path: str | Path) -> pd.DataFrame:
    """Spots x genes table (TSV/CSV, optionally gzipped); every count must be a non-negative number."""
    path = _require(Path(path), "counts file")
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
    if table.isna().to_numpy().any():
        raise He2stError("counts table has missing values", path)
    if (table.to_numpy() < 0).any():
        raise He2stError("counts table has negative values", path)
    # pandas renames a repeated column G to G.1; keep the file's names so duplicates are seen (build_adata)
    table.columns = pd.read_csv(path, sep=sep, header=None, nrows=1).iloc[0, 1:].astype(str).to_list()
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        raise He2stError(f"duplicate spot barcode {table.index[table.index.duplicated()][0]!r}", path)
    return table


def _join_barcodes(counts_ids: pd.Index, pos_ids: pd.Index, counts_file: Path, pos_file: Path) -> pd.Index:
    common = counts_ids.intersection(pos_ids, sort=False)
    if len(common) == 0:
        raise He2stError(
            f"no spot barcode in common with {pos_file} (counts: {counts_ids[0]!r}..., "
            f"positions: {pos_ids[0]!r}...)",
            counts_file,
        )
    return common


# ---------------------------------------------------------------------------- legacy ST
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
    counts_file, spots_file = Path(counts_file), _require(Path(spots_file), "spot file")
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
    common = _join_barcodes(table.index, spots.index, counts_file, spots_file)
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
        source={"counts": str(counts_file), "positions": str(spots_file)}
        | ({"image": str(image)} if image is not None else {}),
    )
    sample.validate()
    return sample


# ---------------------------------------------------------------------------- 10x Space Ranger
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _read_10x_h5(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    try:
        with h5py.File(path, "r") as fh:
            grp = fh["matrix"]
            n_genes, n_barcodes = (int(v) for v in grp["shape"][:])
            mat = sp.csc_matrix(
                (grp["data"][:], grp["indices"][:], grp["indptr"][:]), shape=(n_genes, n_barcodes)
            )
            barcodes = [b.decode() for b in grp["barcodes"][:]]
            feats = grp["features"]
            names = [b.decode() for b in feats["name"][:]]
            types = [b.decode() for b in feats["feature_type"][:]] if "feature_type" in feats else None
    except (OSError, KeyError, ValueError) as exc:
        raise He2stError(f"not a 10x feature-barcode HDF5 matrix ({type(exc).__name__}: {exc})", path) from exc
    keep = np.arange(len(names)) if types is None else np.flatnonzero(np.array(types) == "Gene Expression")
    return mat.T.tocsr()[:, keep], barcodes, [names[i] for i in keep]


def _read_10x_mtx(folder: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    def _open(name: str):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.exists():
                return gzip.open(candidate, "rt") if candidate.suffix == ".gz" else open(candidate)
        raise He2stError(f"{name}(.gz) missing from matrix folder", folder)

    try:
        with _open("matrix.mtx") as fh:
            mat = sp.csr_matrix(scipy.io.mmread(fh).T)
        with _open("barcodes.tsv") as fh:
            barcodes = [line.strip() for line in fh if line.strip()]
        with _open("features.tsv") as fh:
            rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except (OSError, ValueError, EOFError) as exc:
        raise He2stError(f"cannot read 10x matrix folder ({exc})", folder) from exc
    if mat.shape != (len(barcodes), len(rows)):
        raise He2stError(
            f"matrix is {mat.shape[1]} features x {mat.shape[0]} barcodes but the folder lists "
            f"{len(rows)} features and {len(barcodes)} barcodes", folder)
    keep = [i for i, r in enumerate(rows) if len(r) < 3 or r[2] == "Gene Expression"]
    return mat[:, keep], barcodes, [rows[i][1] if len(rows[i]) > 1 else rows[i][0] for i in keep]


def read_tissue_positions(path: Path) -> pd.DataFrame:
    """Space Ranger spot positions: ``tissue_positions.csv`` (header), ``_list.csv`` (often none), parquet."""
    try:
        if path.suffix == ".parquet":
            try:
                table = pd.read_parquet(path)
            except ImportError as exc:
                raise He2stError("reading parquet positions needs pyarrow: pip install 'he2st[formats]'", path) from exc
        else:
            first = path.read_text().split("\n", 1)[0].split(",")[0].strip()
            header = 0 if first == "barcode" else None
            table = pd.read_csv(path, header=header)
            if header is None:
                table.columns = POSITION_COLUMNS[: table.shape[1]]
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise He2stError(f"cannot parse tissue positions ({exc})", path) from exc
    missing = set(POSITION_COLUMNS) - set(table.columns)
    if missing:
        raise He2stError(f"tissue positions lack columns {sorted(missing)}", path)
    table = table.set_index("barcode")
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        raise He2stError(f"duplicate spot barcode {table.index[table.index.duplicated()][0]!r}", path)
    return table


def read_visium(
    outs: str | Path,
    image: str | Path | None,
    sample_id: str | None = None,
    patient_id: str | None = None,
    counts: str = "filtered_feature_bc_matrix.h5",
    dataset: str | None = None,
) -> Sample:
    """10x Space Ranger ``outs/`` folder (Visium v1/v2/CytAssist, or one Visium HD bin folder).

    The full-resolution H&E is not part of ``outs/``: pass the image given to Space Ranger as
    ``image``. µm/px comes from ``microns_per_pixel`` when present, else 55 µm / ``spot_diameter_fullres``.
    """
    outs = _require(Path(outs), "Space Ranger outs folder")
    spatial_dir = outs / "spatial"
    counts_path = outs / counts
    if counts_path.exists() and counts_path.is_file():
        mat, barcodes, genes = _read_10x_h5(counts_path)
    elif counts == "filtered_feature_bc_matrix.h5" and (outs / "filtered_feature_bc_matrix").is_dir():
        counts_path = outs / "filtered_feature_bc_matrix"
        mat, barcodes, genes = _read_10x_mtx(counts_path)
    else:
        raise He2stError(f"no {counts} or filtered_feature_bc_matrix/ folder", outs)
    for name in ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet"):
        pos_path = spatial_dir / name
        if pos_path.exists():
            break
    else:
        raise He2stError("no tissue_positions.csv, tissue_positions_list.csv or tissue_positions.parquet", spatial_dir)
    positions = read_tissue_positions(pos_path)
    sf_path = _require(spatial_dir / "scalefactors_json.json", "scalefactors_json.json")
    try:
        scalefactors = json.loads(sf_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise He2stError(f"cannot parse scale factors ({exc})", sf_path) from exc
    if pd.Index(barcodes).has_duplicates:
        raise He2stError("duplicate barcodes in the count matrix", counts_path)
    common = _join_barcodes(pd.Index(barcodes), positions.index, counts_path, pos_path)
    positions = positions.loc[common]
    positions = positions[positions["in_tissue"].astype(int) == 1]
    if len(positions) == 0:
        raise He2stError("no spot left after keeping spots under tissue (in_tissue == 1)", pos_path)
    row_of = {b: i for i, b in enumerate(barcodes)}
    rows = np.array([row_of[b] for b in positions.index])
    xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    adata = build_adata(mat[rows], list(positions.index), genes, xy, where=counts_path)
    adata.obs["array_row"] = positions["array_row"].astype(int).to_numpy()
    adata.obs["array_col"] = positions["array_col"].astype(int).to_numpy()
    if "microns_per_pixel" in scalefactors:
        um_per_px = float(scalefactors["microns_per_pixel"])
    elif scalefactors.get("spot_diameter_fullres"):
        um_per_px = VISIUM_SPOT_UM / float(scalefactors["spot_diameter_fullres"])
    else:
        raise He2stError("neither microns_per_pixel nor spot_diameter_fullres present", sf_path)
    spot_um = float(scalefactors.get("bin_size_um", VISIUM_SPOT_UM))
    sid = sample_id or outs.parent.name or outs.name
    sample = Sample(
        sample_id=sid,
        patient_id=patient_id or sid,
        adata=adata,
        pixel_size_um=um_per_px,
        spot_diameter_um=spot_um,
        image_path=None if image is None else Path(image),
        technology="visium_hd" if "bin_size_um" in scalefactors else "visium",
        dataset=dataset,
        source={"counts": str(counts_path), "positions": str(pos_path), "scalefactors": str(sf_path)}
        | ({"image": str(image)} if image is not None else {}),
    )
    sample.validate()
    return sample


# ---------------------------------------------------------------------------- HEST-1k and plain h5ad
def read_h5ad_sample(
    path: str | Path,
    image: str | Path | None,
    pixel_size_um: float,
    sample_id: str | None = None,
    patient_id: str | None = None,
    spot_diameter_um: float = VISIUM_SPOT_UM,
    technology: str = "h5ad",
    dataset: str | None = None,
) -> Sample:
    """Any AnnData with raw counts in ``X`` and spot centres (x, y) in ``obsm['spatial']``. Without
    ``sample_id``, the sample is named by the file's own library id (the one key of ``uns['spatial']``, the
    scverse convention), else by the file's stem."""
    path = _require(Path(path), "AnnData file")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated files raise many exception types
        raise He2stError(f"not a readable .h5ad file ({type(exc).__name__}: {exc})", path) from exc
    if "spatial" not in adata.obsm:
        raise He2stError("AnnData has no obsm['spatial'] spot coordinates", path)
    if adata.obs_names.has_duplicates:
        raise He2stError(f"duplicate spot barcode {adata.obs_names[adata.obs_names.duplicated()][0]!r}", path)
    if "in_tissue" in adata.obs:
        adata = adata[adata.obs["in_tissue"].astype(int) == 1].copy()
    if adata.n_obs == 0:
        raise He2stError("no spot left after keeping spots under tissue (in_tissue == 1)", path)
    X = adata.X
    values = X.data if sp.issparse(X) else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number) or (values.size and (values < 0).any()):
        raise He2stError("X must hold non-negative raw counts", path)
    built = build_adata(X, list(adata.obs_names), list(adata.var_names), np.asarray(adata.obsm["spatial"])[:, :2],
                        where=path)
    for col in adata.obs.columns:
        built.obs[col] = adata.obs[col].to_numpy()
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
        source={"counts": str(path)} | ({"image": str(image)} if image is not None else {}),
    )
    sample.validate()
    return sample


def _own_library_id(adata: ad.AnnData, path: Path) -> str | None:
    """The one library id of ``uns['spatial']`` (checked: it names output files), or None."""
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict) or len(libraries) != 1:
        return None
    return id_from_file(next(iter(libraries)), "library id in uns['spatial']", path)


def read_hest(root: str | Path, sample_id: str, patient_id: str | None = None) -> Sample:
    """A HEST-1k sample: ``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``.

    The patient comes from ``patient_id``, else the metadata's ``patient``; without either, the
    sample is its own patient -- then serial sections of one patient are not grouped, so pass it.
    """
    root = Path(root)
    meta_path = _require(root / "metadata" / f"{sample_id}.json", "HEST metadata")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise He2stError(f"cannot parse HEST metadata ({exc})", meta_path) from exc
    mpp = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
    if not mpp:
        raise He2stError("metadata has no pixel_size_um_estimated", meta_path)
    image = _require(root / "wsis" / f"{sample_id}.tif", "HEST whole-slide image")
    return read_h5ad_sample(
        root / "st" / f"{sample_id}.h5ad",
        image,
        pixel_size_um=float(mpp),
        sample_id=sample_id,
        patient_id=patient_id or id_from_file(meta.get("patient") or sample_id, f"patient id of sample {sample_id}",
                                             meta_path),
        spot_diameter_um=float(meta.get("spot_diameter") or VISIUM_SPOT_UM),
        technology=str(meta.get("st_technology", "hest")).lower(),
        dataset="hest",
    )


# ---------------------------------------------------------------------------- Visium HD
VISIUM_HD_BINS_UM = (2, 8, 16)


def sum_into_squares(counts: sp.spmatrix | np.ndarray, xy_px: np.ndarray, genes: list[str], side_px: float,
                     min_members: float, members_name: str, where: Path) -> ad.AnnData:
    """Counts of bins or cells at ``xy_px`` summed into a grid of squares of ``side_px`` (each member goes
    to the square holding its centre); squares with fewer than ``min_members`` members are dropped. The
    pseudo-spots sit at the squares' centres, with ``array_col``/``array_row`` and the member count
    (``obs[members_name]``, e.g. ``n_bins``)."""
    cells = np.floor(xy_px / side_px).astype(np.int64)
    keys, group = np.unique(cells, axis=0, return_inverse=True)
    group = group.ravel()
    members = sp.csr_matrix((np.ones(len(group), np.float32), (group, np.arange(len(group)))),
                            shape=(len(keys), len(group)))
    n_members = np.asarray(members.sum(axis=1)).ravel()
    keep = n_members >= min_members
    if not keep.any():
        raise He2stError(f"no pseudo-spot of {side_px:.0f} px has {min_members:g} or more members under tissue", where)
    adata = build_adata(members[keep] @ sp.csr_matrix(counts), [f"ps_{x}_{y}" for x, y in keys[keep]], genes,
                        (keys[keep] + 0.5) * side_px, where=where)
    adata.obs["array_col"], adata.obs["array_row"] = keys[keep, 0], keys[keep, 1]
    adata.obs[members_name] = n_members[keep].astype(np.int64)
    return adata


def read_visium_hd(
    outs: str | Path,
    image: str | Path | None,
    sample_id: str,
    patient_id: str | None = None,
    bin_um: int = 8,
    pseudo_spot_um: float = VISIUM_SPOT_UM,
    dataset: str | None = None,
    pixel_size_um: float | None = None,
) -> Sample:
    """A Visium HD ``outs/`` folder: the square bins of ``binned_outputs/square_<bin>um`` summed into square
    pseudo-spots of ``pseudo_spot_um`` (default 55 µm, a Visium spot's size, so a model sees the field it
    was trained on). Bins map to pseudo-spots by their centre; a pseudo-spot is kept when at least half of
    its area is covered by bins under tissue, so tissue edges do not make near-empty spots."""
    if bin_um not in VISIUM_HD_BINS_UM:
        raise He2stError(f"Visium HD bin size must be one of {VISIUM_HD_BINS_UM} µm, got {bin_um}")
    folder = _require(Path(outs) / "binned_outputs" / f"square_{bin_um:03d}um", f"Visium HD {bin_um} µm bin folder")
    bins = read_visium(folder, image, sample_id=sample_id, patient_id=patient_id, dataset=dataset)
    if pixel_size_um is not None:
        bins.pixel_size_um = float(pixel_size_um)
    if pseudo_spot_um < bin_um:
        raise He2stError(f"pseudo-spots of {pseudo_spot_um:g} µm are smaller than the {bin_um} µm bins", folder)
    side_px = pseudo_spot_um / bins.pixel_size_um
    adata = sum_into_squares(bins.adata.X, bins.spatial, list(bins.adata.var_names), side_px,
                             0.5 * (pseudo_spot_um / bin_um) ** 2, "n_bins", folder)
    return Sample(
        sample_id=bins.sample_id, patient_id=bins.patient_id, adata=adata, pixel_size_um=bins.pixel_size_um,
        spot_diameter_um=float(pseudo_spot_um), image_path=bins.image_path, technology="visium_hd",
        dataset=dataset, source=bins.source | {"bin_um": str(bin_um), "pseudo_spot_um": f"{pseudo_spot_um:g}"},
    )


# ---------------------------------------------------------------------------- Xenium
XENIUM_PIXEL_UM = 0.2125  # the morphology image's µm/px (experiment.xenium "pixel_size")


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
    folder = _require(Path(folder), "Xenium output folder")
    counts_path = _require(folder / "cell_feature_matrix.h5", "cell_feature_matrix.h5")
    mat, cell_ids, genes = _read_10x_h5(counts_path)
    cells = _read_cells(folder)
    morph_um = XENIUM_PIXEL_UM
    if (folder / "experiment.xenium").exists():
        try:
            morph_um = float(json.loads((folder / "experiment.xenium").read_text()).get("pixel_size", morph_um))
        except (OSError, ValueError) as exc:
            raise He2stError(f"cannot parse experiment.xenium ({exc})", folder / "experiment.xenium") from exc
    common = _join_barcodes(pd.Index(cell_ids), cells.index, counts_path, folder / "cells")
    row_of = {c: i for i, c in enumerate(cell_ids)}
    counts = mat[np.array([row_of[c] for c in common])]
    um = cells.loc[common, ["x_centroid", "y_centroid"]].to_numpy(float)
    if alignment is not None:
        path = _require(Path(alignment), "alignment matrix")
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
    if pseudo_spot_um is None:
        adata = build_adata(counts, list(common), genes, xy, where=counts_path)
        area = cells.loc[common, "cell_area"].to_numpy(float) if "cell_area" in cells else np.array([78.5])
        spot_um = float(2 * np.sqrt(np.median(area) / np.pi))
    else:
        side_px = pseudo_spot_um / mpp
        per_square = np.unique(np.floor(xy / side_px).astype(np.int64), axis=0, return_counts=True)[1]
        adata = sum_into_squares(counts, xy, genes, side_px, 0.5 * float(np.median(per_square)), "n_cells", folder)
        spot_um = float(pseudo_spot_um)
    return Sample(
        sample_id=sample_id, patient_id=patient_id or sample_id, adata=adata, pixel_size_um=mpp,
        spot_diameter_um=spot_um, image_path=None if image is None else Path(image), technology="xenium",
        dataset=dataset, source={"counts": str(counts_path), "cells": str(folder)}
        | ({"image": str(image)} if image is not None else {}) | ({"alignment": str(alignment)} if alignment else {}),
    )


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


class SampleSource(BaseModel):
    """A user's own section, read by one of the technology readers."""

    model_config = ConfigDict(extra="forbid")

    reader: Literal["visium", "visium_hd", "xenium", "st", "hest", "h5ad"]
    sample_id: str
    patient_id: str | None = None
    path: Path = Field(description="outs/ folder (visium, visium_hd), output folder (xenium), counts file (st), "
                                   "HEST root (hest), .h5ad (h5ad)")
    image: Path | None = None
    spots_file: Path | None = Field(None, description="st: the *_selection.tsv spot file")
    pixel_size_um: float | None = Field(
        None, gt=0, description="µm/px of the image: required for h5ad; for the other readers it overrides "
        "what they derive (st: from the spot grid; visium: scale factors; hest: metadata)")
    bin_um: int = Field(8, description="visium_hd: the bins summed into pseudo-spots (2, 8 or 16 µm)")
    pseudo_spot_um: float = Field(VISIUM_SPOT_UM, gt=0, description="visium_hd, xenium: side of the square pseudo-spots, µm")
    cell_level: bool = Field(False, description="xenium: one spot per cell instead of pseudo-spots")
    alignment: Path | None = Field(None, description="xenium: the H&E alignment matrix (3 x 3 CSV, H&E px -> morphology px)")
    pitch_um: float | None = Field(
        None, gt=0, description="st: µm per array step (default: detected from the spot lattice, 200 for the "
        "1k array, 100 for the 2k array)")

    @field_validator("sample_id", "patient_id")
    @classmethod
    def _safe(cls, value: str | None) -> str | None:
        """Ids become file names: refused here, before anything is read, if they could escape the folder."""
        if value is not None:
            try:
                safe_name(value, "id")
            except He2stError as exc:
                raise ValueError(str(exc)) from exc
        return value


def read_source(src: SampleSource) -> Sample:
    """Read a user-described sample with the matching reader."""
    if src.pitch_um is not None and src.reader != "st":
        raise He2stError(f"sample {src.sample_id}: pitch_um applies to reader 'st' only")
    if src.reader == "st":
        if src.spots_file is None:
            raise He2stError(f"sample {src.sample_id}: reader 'st' needs spots_file")
        return read_st(src.path, src.spots_file, src.image, src.sample_id, src.patient_id or src.sample_id,
                       pitch_um=src.pitch_um, pixel_size_um=src.pixel_size_um)
    if src.reader == "xenium":
        return read_xenium(src.path, src.image, src.sample_id, src.patient_id, src.alignment, src.pixel_size_um,
                           None if src.cell_level else src.pseudo_spot_um)
    if src.reader == "visium_hd":
        return read_visium_hd(src.path, src.image, src.sample_id, src.patient_id, src.bin_um, src.pseudo_spot_um,
                              pixel_size_um=src.pixel_size_um)
    if src.reader in ("visium", "hest"):
        sample = (read_visium(src.path, src.image, sample_id=src.sample_id, patient_id=src.patient_id)
                  if src.reader == "visium" else read_hest(src.path, src.sample_id, patient_id=src.patient_id))
        if src.pixel_size_um is not None:
            sample.pixel_size_um = float(src.pixel_size_um)
        return sample
    if src.pixel_size_um is None:
        raise He2stError(f"sample {src.sample_id}: reader 'h5ad' needs pixel_size_um")
    return read_h5ad_sample(src.path, src.image, src.pixel_size_um, src.sample_id, src.patient_id)
