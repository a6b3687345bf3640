"""``he2st predict``: expression maps for a whole-slide image that was never sequenced.

The slide is processed as a stream of spot chunks -- read patches, embed them with the model's
encoder, predict -- so memory depends on the chunk size, not on the slide size. Each finished chunk
(features and predictions) is committed to ``<name>.partial.h5`` with a fingerprint of everything
that changes the numbers, so an interrupted run resumes where it stopped. Methods that read
neighbouring spots (NH2ST) get each chunk plus a halo of its spots' neighbours, taken from the
committed features, so chunk borders do not cut neighbourhoods. At the end one ``.h5ad`` is
written atomically in the scverse layout (``obsm["spatial"]`` in level-0 px,
``uns["spatial"][library_id]`` with a hires image and scale factors), so
``squidpy.pl.spatial_scatter`` / ``scanpy.pl.spatial`` work unchanged.

Patches are cut exactly as ``he2st prepare`` cuts training patches (same level choice, rounding
and resampling as :func:`he2st.data.slide.read_patch`), but a chunk's patches are read in blocks
so that neighbouring patches share one decode of the tiles they overlap.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.spatial import cKDTree

from he2st.config import EmbedConfig
from he2st.data.patches import PatchSpec
from he2st.data.sample import Sample
from he2st.data.slide import Slide, open_slide
from he2st.data.spots import SpotSet
from he2st.embed import embed_patches, load_encoder, ready_for_inference
from he2st.encoders import Encoder
from he2st.errors import He2stError
from he2st.io import atomic_path
from he2st.methods.base import Method, load_method
from he2st.predict.grid import SpotGrid, grid_from_sample, hex_grid
from he2st.predict.tissue import detect_tissue, load_mask

PARTIAL_FORMAT = 1
MAX_UPSAMPLE = 2.0  # beyond this, patches would be blurrier than anything the encoder saw in training
BLOCK_PX = 2048  # side (level px) of the blocks a chunk's patches are read in


@dataclass
class ChunkInfo:
    """Progress and timings of one committed chunk (passed to ``on_chunk``)."""

    index: int
    n_chunks: int
    n_spots: int
    read_s: float  # reading + decoding + resampling patches (in the prefetch thread)
    embed_s: float  # encoder forward pass (incl. preprocessing)
    predict_s: float  # the method's predict for the chunks that became ready (with halos: one behind)


# ---------------------------------------------------------------------------- resolution
def resolve_mpp(mpp: float | None, slide: Slide, sample: Sample | None = None) -> float:
    """Level-0 µm/px: the argument, else the spot sample's pixel size, else the file's, else an error."""
    value = mpp if mpp is not None else (sample.pixel_size_um if sample is not None else slide.embedded_mpp)
    if value is None:
        raise He2stError("the slide does not record its pixel size; pass --mpp (µm per level-0 pixel)", slide.path)
    if not (math.isfinite(value) and value > 0):
        raise He2stError(f"pixel size must be a positive number of µm/px, got {value}", slide.path)
    return float(value)


def check_resolution(mpp: float, patch: PatchSpec, where: str | Path | None = None,
                     max_upsample: float = MAX_UPSAMPLE) -> None:
    """Refuse slides too coarse for the model's patches (more than ``max_upsample`` x upsampling)."""
    need = patch.pixel_size_um
    if mpp > need * max_upsample * 1.001:
        raise He2stError(
            f"slide pixel size {mpp:g} µm/px is too coarse for this model: it reads {patch.field_um:g} µm patches "
            f"at {patch.size_px} px ({need:g} µm/px) and allows at most {max_upsample:g}x upsampling, so the slide "
            f"must be {need * max_upsample:g} µm/px or finer (check --mpp, or scan at higher magnification)", where)


# ---------------------------------------------------------------------------- patches
def read_patches(slide: Slide, xy: np.ndarray, side_level0_px: float, out_px: int,
                 block_px: int = BLOCK_PX) -> np.ndarray:
    """Patches centred on ``xy`` (level-0 px), identical to :func:`read_patch`, read block by block."""
    xy = np.asarray(xy, dtype=np.float64)
    out = np.empty((len(xy), out_px, out_px, 3), dtype=np.uint8)
    if len(xy) == 0:
        return out
    level = slide.best_level(side_level0_px / out_px)
    ds = slide.level_downsamples[level]
    size = max(1, round(side_level0_px / ds))
    top_left = np.round(xy - side_level0_px / 2)  # half-to-even, as Python's round() in read_patch
    lxy = np.floor(top_left / ds).astype(np.int64)  # what read_region computes
    keys = lxy // max(block_px, size)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        gx0, gy0 = lxy[idx].min(axis=0)
        gx1, gy1 = lxy[idx].max(axis=0) + size
        # (g + 0.5) * ds maps back to exactly level pixel g under read_region's floor(x / ds)
        region = slide.read_region((gx0 + 0.5) * ds, (gy0 + 0.5) * ds, level, int(gx1 - gx0), int(gy1 - gy0))
        for i in idx:
            ox, oy = lxy[i, 0] - gx0, lxy[i, 1] - gy0
            crop = region[oy : oy + size, ox : ox + size]
            if size == out_px:
                out[i] = crop
            else:
                out[i] = np.asarray(Image.fromarray(crop).resize((out_px, out_px), Image.Resampling.BILINEAR))
    return out


# ---------------------------------------------------------------------------- helpers
def _select_genes(panel_genes: list[str], genes: str | Sequence[str]) -> list[int]:
    if isinstance(genes, str):
        if genes in ("panel", "all"):
            return list(range(len(panel_genes)))
        genes = [g.strip() for g in genes.split(",") if g.strip()]
    index = {g: i for i, g in enumerate(panel_genes)}
    missing = [g for g in genes if g not in index]
    if missing:
        raise He2stError(f"gene(s) {', '.join(missing[:5])} are not in the model's panel "
                         f"({len(panel_genes)} genes, e.g. {', '.join(panel_genes[:5])})")
    if not genes:
        raise He2stError("no genes selected")
    return [index[g] for g in genes]


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _fingerprint(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stored_fingerprint(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as fh:
            value = fh["uns/he2st/fingerprint"][()]
    except (OSError, KeyError):
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _open_partial(path: Path, fingerprint: str, grid: SpotGrid, n_genes: int, dim: int, chunk: int) -> None:
    """Create the partial file, or keep an existing one made with the same fingerprint."""
    if path.exists():
        try:
            with h5py.File(path, "r") as fh:
                if fh.attrs.get("fingerprint") == fingerprint and fh.attrs.get("format") == PARTIAL_FORMAT:
                    return
        except (OSError, KeyError):
            pass
        path.unlink()  # made another way (or unreadable): start again
    path.parent.mkdir(parents=True, exist_ok=True)
    n, rows = len(grid), max(1, min(chunk, len(grid)))
    with h5py.File(path, "w") as fh:
        fh.create_dataset("xy", data=grid.xy)
        fh.create_dataset("features", shape=(n, dim), dtype=np.float32, chunks=(rows, dim))
        fh.create_dataset("expression", shape=(n, n_genes), dtype=np.float32, chunks=(rows, n_genes),
                          fillvalue=np.nan)
        fh.attrs.update({"format": PARTIAL_FORMAT, "fingerprint": fingerprint, "embedded_chunks": 0,
                         "predicted_chunks": 0})


def neighbourhood_k(method: Method) -> int:
    """How many physically nearest spots a method reads to predict one spot (0: spots are independent).

    Declared by a method as ``spatial_context_k``; NH2ST-style configs (``neighbours`` + ``k``) are
    recognised without it. Chunked prediction then adds these neighbours (a halo) to every chunk.
    """
    k = getattr(method, "spatial_context_k", None)
    if k is None:
        cfg = method.config
        k = int(getattr(cfg, "k", 0)) if getattr(cfg, "neighbours", False) else 0
    return max(0, int(k))


def _halo_rows(tree: cKDTree, xy: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """``rows`` plus every spot as close as their k-th nearest neighbour (ties included), sorted."""
    if k == 0 or len(rows) == 0:
        return rows
    kk = min(k + 1, tree.n)
    dist = tree.query(xy[rows], k=kk)[0].reshape(len(rows), kk)
    found = tree.query_ball_point(xy[rows], dist[:, -1] * (1 + 1e-9) + 1e-9)
    return np.unique(np.concatenate([rows, *[np.asarray(f, dtype=np.int64) for f in found]]))


# ---------------------------------------------------------------------------- main entry
def predict_slide(
    model_path: str | Path,
    slide_path: str | Path | None,
    out_dir: str | Path,
    mpp: float | None = None,
    pitch_um: float = 100.0,
    spots_from: str | Path | Sample | None = None,
    chunk: int = 512,
    batch_size: int = 64,
    genes: str | Sequence[str] = "panel",
    mask: str | Path | np.ndarray | None = None,
    *,
    weights: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    stain: str | None = None,
    tta: str | None = None,
    encoder: Encoder | None = None,
    library_id: str | None = None,
    thumbnail_px: int = 2000,
    max_upsample: float = MAX_UPSAMPLE,
    on_chunk: Callable[[ChunkInfo], None] | None = None,
) -> Path:
    """Predict the model's genes over a slide; returns the written ``<out_dir>/<library_id>.h5ad``.

    Spots: a hexagonal grid of ``pitch_um`` over detected tissue (or over ``mask``, a PNG path or
    a boolean array at any resolution with the slide's aspect), or the spots of ``spots_from``
    (a he2st sample ``.h5ad`` or :class:`Sample`; its image is used when ``slide_path`` is None and
    its pixel size when ``mpp`` is None). ``genes``: ``"panel"`` or a list / comma-separated
    subset. ``encoder`` overrides loading the model's encoder by name (tests, custom weights).
    ``stain``, ``tta`` and ``weights`` default to what the model's training features used (its
    recorded embedding config), so a slide is encoded the way the model saw tissue.
    A rerun with identical inputs returns the existing file; an interrupted one resumes.
    """
    model_path = Path(model_path)
    method = load_method(model_path)
    sample = Sample.load(spots_from) if isinstance(spots_from, str | Path) else spots_from
    if slide_path is None:
        if sample is None or sample.image_path is None:
            raise He2stError("no slide given (pass --slide, or --spots-from a sample that has an image)")
        slide_path = sample.image_path
    slide_path = Path(slide_path)
    patch = PatchSpec.model_validate_json(method.patch_spec) if method.patch_spec else PatchSpec()
    model_encoder = json.loads(method.encoder_spec) if method.encoder_spec else {"name": "efficientnet_lite0"}
    trained = (EmbedConfig.model_validate_json(method.embed_config) if method.embed_config
               else EmbedConfig(encoder=model_encoder["name"]))
    stain = stain if stain is not None else trained.stain
    tta = tta if tta is not None else trained.tta
    weights = weights if weights is not None else trained.weights
    gene_index = _select_genes(list(method.panel.genes), genes)
    if chunk <= 0 or batch_size <= 0:
        raise He2stError(f"chunk ({chunk}) and batch size ({batch_size}) must be positive")

    with open_slide(slide_path) as slide:
        mpp = resolve_mpp(mpp, slide, sample)
        check_resolution(mpp, patch, slide_path, max_upsample)
        thumb, scale = slide.thumbnail(thumbnail_px)
        grid, tissue_source = _spots(slide, thumb, scale, mpp, pitch_um, sample, mask)
        library_id = library_id or (sample.sample_id if sample is not None else slide_path.stem)
        try:
            enc_cfg = EmbedConfig(encoder=model_encoder["name"], weights=weights, batch_size=batch_size,
                                  device=device, precision=precision, stain=stain, tta=tta)
        except ValueError as exc:  # pydantic: unknown precision/stain/tta
            raise He2stError(f"invalid embedding option: {exc.errors()[0]['msg']}") from exc
        encoder = encoder or load_encoder(enc_cfg)
        _check_encoder(encoder, model_encoder, model_path)
        out_dir = Path(out_dir)
        final = out_dir / f"{library_id}.h5ad"
        fingerprint = _fingerprint({
            "model": _file_id(model_path), "slide": _file_id(slide_path), "mpp": round(mpp, 9),
            "patch": patch.model_dump(), "encoder": encoder.spec.model_dump_json(), "stain": stain, "tta": tta,
            "genes": [method.panel.genes[i] for i in gene_index], "chunk": chunk,
            "xy": hashlib.sha1(np.ascontiguousarray(grid.xy).tobytes()).hexdigest(), "names": grid.names,
        })
        if final.exists() and _stored_fingerprint(final) == fingerprint:
            return final
        partial = out_dir / f"{library_id}.partial.h5"
        _open_partial(partial, fingerprint, grid, len(gene_index), encoder.embed_dim, chunk)
        _run_chunks(slide, method, encoder, enc_cfg, grid, patch, mpp, library_id, gene_index, partial, chunk,
                    on_chunk)

    meta = {
        "fingerprint": fingerprint, "target_transform": method.panel.transform, "method": method.name,
        "model": str(model_path.resolve()), "encoder": encoder.spec.name, "encoder_weights": encoder.spec.weights,
        "patch_spec": patch.model_dump_json(), "mpp": mpp, "slide": str(slide_path.resolve()),
        "spots": "hex_grid" if sample is None else f"sample:{sample.sample_id}", "tissue": tissue_source,
        "pitch_um": float(grid.pitch_um or 0.0), "spot_diameter_um": float(grid.spot_diameter_um),
        "trained_on": json.dumps(method.trained_on), "stain": stain, "tta": tta,
    }
    _write_h5ad(partial, final, grid, [method.panel.genes[i] for i in gene_index], thumb, scale, mpp,
                library_id, meta)
    partial.unlink()
    return final


def _spots(slide: Slide, thumb: np.ndarray, scale: float, mpp: float, pitch_um: float, sample: Sample | None,
           mask: str | Path | np.ndarray | None) -> tuple[SpotGrid, str]:
    """The spot grid and a note on where the tissue area came from."""
    tissue = None
    if isinstance(mask, np.ndarray):
        tissue = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST)) > 127
        source = "mask:array"
    elif mask is not None:
        tissue = load_mask(mask, shape=thumb.shape[:2], slide_size=slide.dimensions)
        source = f"mask:{Path(mask).resolve()}"
    if sample is not None:
        grid = grid_from_sample(sample)
        w, h = slide.dimensions
        off = (grid.xy[:, 0] < 0) | (grid.xy[:, 1] < 0) | (grid.xy[:, 0] >= w) | (grid.xy[:, 1] >= h)
        if off.any():
            raise He2stError(f"{int(off.sum())} spot(s) of sample {sample.sample_id} lie off the {w}x{h} slide; "
                             "is this the sample's image?", slide.path)
        if tissue is not None:
            mx = np.clip(np.floor(grid.xy[:, 0] * scale).astype(int), 0, tissue.shape[1] - 1)
            my = np.clip(np.floor(grid.xy[:, 1] * scale).astype(int), 0, tissue.shape[0] - 1)
            grid.in_tissue = tissue[my, mx].astype(np.int64)
            return grid, source
        return grid, "sample"
    if tissue is None:
        tissue = detect_tissue(thumb, mpp / scale, where=slide.path)
        source = "detected"
    grid = hex_grid(tissue, scale, pitch_um, mpp)
    if len(grid) == 0:
        raise He2stError(f"the tissue area holds no spot centre at a {pitch_um:g} µm pitch", slide.path)
    return grid, source


def _check_encoder(encoder: Encoder, model_encoder: dict, model_path: Path) -> None:
    expected = model_encoder.get("embed_dim")
    if encoder.spec.name != model_encoder.get("name") or (expected is not None and encoder.embed_dim != expected):
        raise He2stError(
            f"model was trained on {expected}-d features of encoder {model_encoder.get('name')!r}, "
            f"got encoder {encoder.spec.name!r} ({encoder.embed_dim}-d)", model_path)


def _run_chunks(slide: Slide, method: Method, encoder: Encoder, cfg: EmbedConfig, grid: SpotGrid, patch: PatchSpec,
                mpp: float, library_id: str, gene_index: list[int], partial: Path, chunk: int,
                on_chunk: Callable[[ChunkInfo], None] | None) -> None:
    """Read (one chunk ahead, in a thread), embed and commit chunks; predict each chunk once the
    features of its neighbourhood halo (methods that read neighbouring spots) are committed."""
    n = len(grid)
    n_chunks = (n + chunk - 1) // chunk
    k = neighbourhood_k(method)
    tree = cKDTree(grid.xy) if k else None
    side = patch.field_um / mpp
    device, dtype, stain = ready_for_inference(encoder, cfg)

    def read(i: int) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        patches = read_patches(slide, grid.xy[i * chunk : (i + 1) * chunk], side, patch.size_px)
        return patches, time.perf_counter() - start

    def predict(fh: h5py.File, i: int, features: np.ndarray | None, patches: np.ndarray | None) -> None:
        a, b = i * chunk, min((i + 1) * chunk, n)
        rows = _halo_rows(tree, grid.xy, np.arange(a, b), k) if k else np.arange(a, b)
        if features is None or len(rows) != b - a:
            features, patches = fh["features"][rows], None
        spots = SpotSet(sample_ids=np.full(len(rows), library_id, dtype=object),
                        barcodes=np.asarray([grid.names[r] for r in rows], dtype=object), features=features,
                        coords_um=grid.xy[rows] * mpp, genes=list(method.panel.genes), patches=patches)
        pred = method.predict(spots)
        keep = np.searchsorted(rows, np.arange(a, b))  # the chunk's own rows within chunk + halo
        fh["expression"][a:b] = np.asarray(pred.expression, dtype=np.float32)[keep][:, gene_index]
        outputs = [(k_, v, "uncertainty") for k_, v in pred.uncertainty.items()]
        outputs += [(k_, v, "extra") for k_, v in pred.extras.items()]
        for key, values, kind in outputs:
            values = np.asarray(values, dtype=np.float32)
            if values.shape[:1] != (len(rows),) or values.ndim > 2:
                continue
            if key not in fh:
                fh.create_dataset(key, shape=(n, *values.shape[1:]), dtype=np.float32, fillvalue=np.nan)
                fh[key].attrs["kind"] = kind
            fh[key][a:b] = values[keep]
        fh.attrs["predicted_chunks"] = i + 1

    def ready(fh: h5py.File, i: int) -> bool:
        """Chunk ``i``'s halo lies in committed chunks."""
        if not k:
            return int(fh.attrs["embedded_chunks"]) > i
        a, b = i * chunk, min((i + 1) * chunk, n)
        return int(_halo_rows(tree, grid.xy, np.arange(a, b), k)[-1]) // chunk < int(fh.attrs["embedded_chunks"])

    with ThreadPoolExecutor(max_workers=1) as pool, h5py.File(partial, "a") as fh, torch.inference_mode():
        done = int(fh.attrs["embedded_chunks"])
        pending = pool.submit(read, done) if done < n_chunks else None
        for i in range(done, n_chunks):
            patches, read_s = pending.result()
            if i + 1 < n_chunks:
                pending = pool.submit(read, i + 1)
            a, b = i * chunk, min((i + 1) * chunk, n)
            t0 = time.perf_counter()
            features = np.concatenate([
                embed_patches(encoder, patches[j : j + cfg.batch_size], device, dtype, stain, cfg.tta)[0]
                for j in range(0, len(patches), cfg.batch_size)])
            fh["features"][a:b] = features
            fh.attrs["embedded_chunks"] = i + 1  # committed: the resume point for embedding
            t1 = time.perf_counter()
            while int(fh.attrs["predicted_chunks"]) < n_chunks and ready(fh, int(fh.attrs["predicted_chunks"])):
                j = int(fh.attrs["predicted_chunks"])
                predict(fh, j, features if j == i else None, patches if j == i else None)
            fh.flush()
            if on_chunk is not None:
                on_chunk(ChunkInfo(i, n_chunks, b - a, read_s, t1 - t0, time.perf_counter() - t1))
        while int(fh.attrs["predicted_chunks"]) < n_chunks:  # resumed after the last embedding
            predict(fh, int(fh.attrs["predicted_chunks"]), None, None)
        fh.flush()


def _write_h5ad(partial: Path, final: Path, grid: SpotGrid, genes: list[str], thumb: np.ndarray, scale: float,
                mpp: float, library_id: str, meta: dict) -> None:
    with h5py.File(partial, "r") as fh:
        expression = fh["expression"][:]
        uncertainty = {k: fh[k][:] for k in fh if fh[k].attrs.get("kind") == "uncertainty" and fh[k].ndim == 1}
        extras = {k: fh[k][:] for k in fh if fh[k].attrs.get("kind") == "extra"}
    obs = pd.DataFrame(index=pd.Index(grid.names, name="spot"))
    obs["in_tissue"] = grid.in_tissue.astype(np.int64)
    if grid.array_row is not None and grid.array_col is not None:
        obs["array_row"], obs["array_col"] = grid.array_row, grid.array_col
    for key, values in uncertainty.items():
        obs[key] = values
    adata = ad.AnnData(X=expression, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    adata.obsm["spatial"] = grid.xy.astype(np.float64)
    for key, values in extras.items():  # e.g. predicted cell-type proportions
        adata.obsm[key] = values if values.ndim == 2 else values[:, None]
    adata.uns["spatial"] = {library_id: {
        "images": {"hires": np.ascontiguousarray(thumb, dtype=np.uint8)},
        "scalefactors": {"tissue_hires_scalef": float(scale),
                         "spot_diameter_fullres": float(grid.spot_diameter_um / mpp)},
        "metadata": {"source_image_path": meta["slide"], "software": "he2st predict"},
    }}
    adata.uns["he2st"] = meta
    with atomic_path(final, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
