"""Builders for small, realistic test inputs: tissue-like images, pyramidal TIFFs, Space Ranger and HEST folders,
spot sets whose features carry the expression signal, and prepared + embedded work folders."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
import tifffile
from PIL import Image

from he2st.data.spots import SpotSet

HIRES_SCALEF = 0.1  # Space Ranger's tissue_hires_scalef in the folders written here


def tissue_image(height: int, width: int, seed: int = 0, blob: tuple[float, float, float] = (0.5, 0.5, 0.35)) -> np.ndarray:
    """White background with a pink/purple elliptical 'tissue' region with nuclei-like dark dots."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx, r = blob[0] * height, blob[1] * width, blob[2] * min(height, width)
    inside = ((yy - cy) / r) ** 2 + ((xx - cx) / (1.2 * r)) ** 2 < 1
    img = np.full((height, width, 3), 242, dtype=np.uint8)
    img[inside] = (200, 120, 190)
    n_dots = int(inside.sum() / 400)
    ys, xs = rng.integers(0, height, n_dots), rng.integers(0, width, n_dots)
    keep = inside[ys, xs]
    for y, x in zip(ys[keep], xs[keep], strict=True):
        img[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = (70, 40, 120)
    return img


def write_pyramid(path: Path, image: np.ndarray, mpp: float, levels: int = 3, tile: int = 256) -> Path:
    """A tiled, JPEG-compressed pyramid as consecutive top-level pages (what openslide reads)."""
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        current = image
        for level in range(levels):
            tif.write(
                current, tile=(tile, tile), compression="jpeg", photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / (mpp * 2**level), 1e4 / (mpp * 2**level)), resolutionunit="CENTIMETER",
            )
            h, w = current.shape[:2]
            current = np.asarray(Image.fromarray(current).resize((max(1, w // 2), max(1, h // 2))))
    return path


def spot_grid(n_rows: int, n_cols: int, pitch_px: float, origin: tuple[float, float]) -> np.ndarray:
    """(x, y) centres of a regular grid."""
    ys, xs = np.mgrid[0:n_rows, 0:n_cols]
    return np.stack([origin[0] + xs.ravel() * pitch_px, origin[1] + ys.ravel() * pitch_px], axis=1)


def counts_for(xy: np.ndarray, genes: list[str], seed: int = 0) -> np.ndarray:
    """Poisson counts with a spatial gradient so genes carry signal."""
    rng = np.random.default_rng(seed)
    grad = (xy[:, 0] - xy[:, 0].min()) / max(np.ptp(xy[:, 0]), 1)
    rates = 2 + 20 * np.outer(grad, np.linspace(0, 1, len(genes))) + rng.gamma(2, 1, (1, len(genes)))
    return rng.poisson(rates).astype(np.int64)


def write_space_ranger(
    outs: Path, xy: np.ndarray, counts: np.ndarray, genes: list[str], spot_diameter_px: float,
    positions: str = "tissue_positions.csv", header: bool = True, mtx: bool = False, in_tissue: np.ndarray | None = None,
    prefix: str = "", gz: bool = False, loose: bool = False, hires: np.ndarray | None = None,
) -> list[str]:
    """A minimal Space Ranger ``outs/`` folder (10x HDF5 or MTX counts, positions, scale factors). As GEO
    publishes one: ``prefix`` before every file name, ``gz`` compresses every file, ``loose`` puts them all in
    ``outs`` itself (no ``spatial/`` or matrix folder). ``hires``: Space Ranger's ``tissue_hires_image.png``,
    ``HIRES_SCALEF`` times the full-resolution pixels."""
    spatial = outs if loose else outs / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)

    def put(folder: Path, name: str, data: bytes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{prefix}{name}{'.gz' if gz else ''}"
        target.write_bytes(gzip.compress(data) if gz else data)

    n = len(xy)
    barcodes = [f"AAAC{i:08d}-1" for i in range(n)]
    mat = sp.csc_matrix(counts.T)  # genes x barcodes
    if mtx:
        folder = outs if loose else outs / "filtered_feature_bc_matrix"
        buffer = io.BytesIO()
        scipy.io.mmwrite(buffer, mat)
        put(folder, "matrix.mtx", buffer.getvalue())
        put(folder, "barcodes.tsv", ("\n".join(barcodes) + "\n").encode())
        put(folder, "features.tsv", "".join(f"ENSG{i:011d}\t{g}\tGene Expression\n" for i, g in enumerate(genes)).encode())
    else:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as fh:
            fh.attrs["library_ids"] = np.array([b"lib1"])
            grp = fh.create_group("matrix")
            grp["barcodes"] = np.array([b.encode() for b in barcodes])
            grp["data"], grp["indices"], grp["indptr"] = mat.data, mat.indices, mat.indptr
            grp["shape"] = np.array(mat.shape)
            feats = grp.create_group("features")
            feats["name"] = np.array([g.encode() for g in genes])
            feats["id"] = np.array([f"ENSG{i:011d}".encode() for i in range(len(genes))])
            feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        put(outs, "filtered_feature_bc_matrix.h5", buffer.getvalue())
    in_tissue = np.ones(n, dtype=int) if in_tissue is None else in_tissue
    table = pd.DataFrame({
        "barcode": barcodes, "in_tissue": in_tissue, "array_row": np.arange(n) // 10, "array_col": np.arange(n) % 10,
        "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0],
    })
    put(spatial, positions, table.to_csv(index=False, header=header).encode())
    put(spatial, "scalefactors_json.json", json.dumps({
        "spot_diameter_fullres": spot_diameter_px, "tissue_hires_scalef": HIRES_SCALEF, "tissue_lowres_scalef": 0.03,
        "fiducial_diameter_fullres": spot_diameter_px * 1.6}).encode())
    if hires is not None:
        buffer = io.BytesIO()
        Image.fromarray(hires).save(buffer, format="PNG")
        put(spatial, "tissue_hires_image.png", buffer.getvalue())
    return barcodes


def write_hest(root: Path, sample_id: str, image: np.ndarray, mpp: float, xy: np.ndarray, counts: np.ndarray,
               genes: list[str], patient: str | float | None = "P1") -> None:
    """A HEST-1k style sample: st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json."""
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    adata = ad.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=genes))
    adata.obs["in_tissue"] = 1
    adata.obsm["spatial"] = xy
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    write_pyramid(root / "wsis" / f"{sample_id}.tif", image, mpp)
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps({
        "pixel_size_um_estimated": mpp, "spot_diameter": 55.0, "patient": patient, "st_technology": "Visium"}))


def write_st_section(folder: Path, n_rows: int = 5, n_cols: int = 5, pitch_px: float = 100.0,
                     genes: list[str] | None = None, seed: int = 0) -> dict[str, Path]:
    """A small legacy-ST section in the her2st layout: ``cnts.tsv.gz`` (spots x genes, ``<x>x<y>`` ids),
    ``sel.tsv`` (spot grid with pixel positions, all under tissue) and a tissue-like ``he.jpg``.
    With the ST pitch of 200 µm, ``pitch_px`` = 100 gives 2 µm/px."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    genes = genes or [f"G{i}" for i in range(20)]
    xy = spot_grid(n_rows, n_cols, pitch_px, (pitch_px, pitch_px))
    gx, gy = np.arange(n_rows * n_cols) % n_cols + 2, np.arange(n_rows * n_cols) // n_cols + 2
    ids = [f"{x}x{y}" for x, y in zip(gx, gy, strict=True)]
    counts = pd.DataFrame(counts_for(xy, genes, seed=seed), index=ids, columns=genes)
    with gzip.open(folder / "cnts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    pd.DataFrame({"x": gx, "y": gy, "new_x": gx, "new_y": gy, "pixel_x": xy[:, 0], "pixel_y": xy[:, 1],
                  "selected": 1}).to_csv(folder / "sel.tsv", sep="\t", index=False)
    side = int(pitch_px * (max(n_rows, n_cols) + 1))
    Image.fromarray(tissue_image(side, side, seed=seed, blob=(0.5, 0.5, 0.45))).save(folder / "he.jpg")
    return {"counts": folder / "cnts.tsv.gz", "spots": folder / "sel.tsv", "image": folder / "he.jpg"}


def linear_spots(n: int = 240, d: int = 16, g: int = 12, seed: int = 0, n_samples: int = 3) -> SpotSet:
    """Image features that carry the expression signal through a random linear map plus noise, so every
    method has something to learn; ``n`` spots split evenly over ``n_samples`` samples ``s1, s2, ...``."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    features = latent @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))
    targets = np.log1p(np.exp(latent @ rng.normal(size=(3, g)) * 0.7 + 1.0))
    return SpotSet(
        sample_ids=np.repeat(np.array([f"s{i + 1}" for i in range(n_samples)], dtype=object), n // n_samples),
        barcodes=np.arange(n).astype(str).astype(object), features=features.astype(np.float32),
        coords_um=rng.uniform(0, 2000, size=(n, 2)), genes=[f"G{i}" for i in range(g)],
        targets=targets.astype(np.float32),
    )


def prepared_sections(root: Path, patients: dict[str, str], genes: list[str], side: int = 5) -> Path:
    """The work folder of one synthetic ST section per ``{sample: patient}`` (``side`` x ``side`` spots each),
    prepared (patches cut) but not embedded."""
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.prepare import prepare

    sources = []
    for i, (sid, pid) in enumerate(patients.items()):
        files = write_st_section(root / "raw" / sid, n_rows=side, n_cols=side, pitch_px=200, genes=genes,
                                 seed=i)  # 1 µm/px
        sources.append({"reader": "st", "sample_id": sid, "patient_id": pid, "path": files["counts"],
                        "spots_file": files["spots"], "image": files["image"]})
    work = root / "work"
    prepare(PrepareConfig(work_dir=work, data={"dataset": None, "samples": sources}))
    return work


def embedded_sections(root: Path, patients: dict[str, str], genes: list[str]):
    """``(work dir, embed config)``: one synthetic ST section per ``{sample: patient}`` (25 spots each),
    prepared and embedded with a seeded ``test_vit`` whose weights are saved under ``root``, so that a
    training run with ``embed.weights`` set finds the cache already made."""
    # imported here: torch and the workflows take seconds that tests which only write files should not pay
    import torch

    from he2st.data.embeddings import EmbedConfig
    from he2st.data.patches import PatchSpec
    from he2st.data.workspace import Workspace
    from he2st.encoders import create
    from he2st.workflows.embed import embed_workspace

    work = prepared_sections(root, patients, genes)
    torch.manual_seed(0)
    weights = root / "test_vit.pth"
    torch.save(create("test_vit", pretrained=False).backbone.state_dict(), weights)
    embed = EmbedConfig(encoder="test_vit", weights=weights, num_workers=0)
    embed_workspace(Workspace(work), sorted(patients), PatchSpec(), embed)
    return work, embed


def embedded_with_signature(root: Path, patients: dict[str, str], genes: list[str], signature: str):
    """``(work dir, embed config, signature file)``: :func:`embedded_sections` and a gene,weight TLS signature
    (``signature``: its rows after the header, tab-separated)."""
    work, embed = embedded_sections(root, patients, genes)
    path = root / "signature.tsv"
    path.write_text("gene\tweight\n" + signature)
    return work, embed, path


def random_knn_model(encoder, genes: list[str], n: int = 40, weights: Path | None = None, seed: int = 0):
    """A fitted ``knn`` over ``n`` random training spots whose features have ``encoder``'s width, with a card
    that says how to make its inputs (``weights``: the encoder weights file the card records)."""
    from he2st.data.embeddings import EmbedConfig
    from he2st.data.genes import GenePanel
    from he2st.data.patches import PatchSpec
    from he2st.data.spots import SpotSet
    from he2st.methods import ModelCard, create_method

    rng = np.random.default_rng(seed)
    knn = create_method("knn", top_k=5)
    knn.card = ModelCard(method="knn", panel=GenePanel(genes=genes), encoder=encoder.spec, patch=PatchSpec(),
                         embedding=EmbedConfig(encoder=encoder.spec.name, weights=weights))
    knn.fit(SpotSet(np.array(["T"] * n, dtype=object), np.array([f"b{i}" for i in range(n)], dtype=object),
                    rng.normal(size=(n, encoder.embed_dim)).astype(np.float32), np.zeros((n, 2)), genes,
                    rng.gamma(2, 1, (n, len(genes))).astype(np.float32)))
    return knn
