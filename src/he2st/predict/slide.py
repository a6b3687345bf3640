"""Whole-slide prediction: expression maps for a slide that was never sequenced.

:func:`run_prediction` takes a :class:`PredictConfig` and a fitted method. The slide is processed as
a stream of spot chunks -- read patches (one chunk ahead, in a thread), embed them as the model's
training features were embedded, predict -- so memory depends on the chunk size, not on the slide
size. Each finished chunk is committed to the partial file (:mod:`he2st.predict.store`), so an
interrupted run resumes where it stopped. Methods that read neighbouring spots (``halo_hops``: NH2ST,
query-time context, neighbour context features) get each chunk plus a halo of its spots' neighbours,
taken from the committed features, so chunk borders do not cut neighbourhoods; methods that read other
views of a spot (``reads_views``: the context field, sub-spot tiles, another encoder, the adapted encoder)
get them cut and embedded beside each spot's patch, as ``he2st embed`` makes them (the adapted weights are
the file the model card records, checked by its sha256).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy.spatial import cKDTree

from he2st.data.embeddings import EmbedConfig
from he2st.data.patches import PatchSpec, check_resolution, read_patches
from he2st.data.sample import Sample
from he2st.data.slide import Slide, open_slide
from he2st.data.spots import SpotSet
from he2st.data.views import FIELD, adapted_recipe, is_encoder_view, view_embed, view_tiles
from he2st.encoders import Encoder, create
from he2st.encoders.inference import PatchEmbedder, arithmetic, load_encoder
from he2st.encoders.spec import EncoderSpec
from he2st.encoders.weights import weights_sha256
from he2st.errors import He2stError
from he2st.io import (
    check_output,
    name_from_stem,
    not_an_input,
    output_lock,
    overwriting,
    sha256_file,
    writing,
)
from he2st.methods import Method, ModelCard
from he2st.predict.config import PredictConfig
from he2st.predict.grid import SpotGrid, check_pitch, grid_from_sample, hex_grid
from he2st.predict.sdata import store_is_current, write_spatialdata
from he2st.predict.store import (
    file_id,
    fingerprint,
    method_fingerprint,
    open_partial,
    stored_fingerprint,
    warn_if_out_of_distribution,
    write_h5ad,
)
from he2st.predict.tissue import detect_tissue, load_mask


@dataclass
class ViewEmbedder:
    """How one view of each spot is made on a slide: its embedder, fed the spot patches or (``field``)
    the context-field patches."""

    name: str
    embedder: PatchEmbedder
    field: bool

    @property
    def width(self) -> int:
        return self.embedder.encoder.embed_dim


def view_embedders(views: list[str], encoder: Encoder, config: EmbedConfig, patch_px: int,
                   spot: PatchEmbedder, adapted: dict[str, Encoder] | None = None) -> list[ViewEmbedder]:
    """The embedders of ``views`` (a method's ``reads_views``), each the way ``he2st embed`` makes the view:
    the spot's own embedder on the field, tiled for the tiles, ``adapted[view]`` (:func:`adapted_encoder`)
    for an adapted view, an encoder view's own preset."""
    out = []
    for view in views:
        if view == FIELD:
            embedder = spot
        elif adapted_recipe(view) is not None:
            if view not in (adapted or {}):
                raise ValueError(f"the {view} view needs its adapted encoder")
            found = adapted[view]
            embedder = PatchEmbedder(found, view_embed(config, view, Path(found.spec.weights)), patch_px)
        elif is_encoder_view(view):
            embedder = PatchEmbedder(create(view), view_embed(config, view), patch_px)
        else:
            embedder = PatchEmbedder(encoder, view_embed(config, view), patch_px, tiles=view_tiles(view))
        out.append(ViewEmbedder(view, embedder, view == FIELD))
    return out


def check_view_encoders(card: ModelCard, views: list[ViewEmbedder], where: Path | None) -> None:
    """Refuse, in one line, an encoder view whose weights here are not those its card records the model was
    trained with (a preset's weights file replaced, or another file named by ``$HE2ST_WEIGHTS``)."""
    for view in views:
        _check_weights(view.embedder.encoder.spec, card.view_encoders.get(view.name, {}).get("weights_sha256"),
                      f"{view.name} weights", f"the {card.method} model's '{view.name}' view",
                      "install the same weights or retrain", where)


def _check_weights(spec: EncoderSpec, recorded: str | None, what: str, trained: str, advice: str,
                  where: Path | None, name_file: bool = False) -> None:
    """Refuse, in one line, an encoder whose weights file does not hold the weights (sha256 ``recorded``) that
    ``trained`` (the model, or one of its views) learned from: its features would not be those the model saw.
    Nothing recorded (a hub download) is not checked. ``name_file``: the message names the weights file too."""
    if recorded is None:
        return
    found = weights_sha256(spec)
    if found != recorded:
        file = f"{spec.weights}, " if name_file else ""
        raise He2stError(f"the {what} here ({file}sha256 {(found or 'not computed')[:12]}...) are not those {trained} "
                         f"was trained with (sha256 {recorded[:12]}...); {advice}", where)


def adapted_encoder(card: ModelCard, view: str, where: Path | None) -> Encoder:
    """The encoder of an adapted view a model reads: its encoder with the adapted weights file its card
    records for the view, refused in one line when the card records none, or the file is gone or is not the same."""
    record = card.adapted_views.get(view, {})
    if card.encoder is None or not record.get("weights") or not record.get("weights_sha256"):
        raise He2stError(f"the {card.method} model reads the '{view}' view, but its card records no adapted "
                         "weights to embed it with; train it with `he2st train`", where)
    path = Path(record["weights"])
    if not path.is_file():
        raise He2stError(f"the adapted weights the {card.method} model's '{view}' view needs are missing "
                         "(they stay in the encoders/ folder of the work folder it was trained in)", path)
    if sha256_file(path) != record["weights_sha256"]:
        raise He2stError(f"these adapted weights are not those the {card.method} model was trained with "
                         f"(sha256 {record['weights_sha256'][:12]}...); re-run `he2st adapt` or retrain", path)
    return create(card.encoder.name, weights=path)


@dataclass
class ChunkInfo:
    """Progress and timings of one committed chunk (passed to ``on_chunk``)."""

    index: int
    n_chunks: int
    n_spots: int
    read_s: float  # reading + decoding + resampling patches (in the prefetch thread)
    embed_s: float  # encoder forward pass (incl. preprocessing)
    predict_s: float  # the method's predict for the chunks that became ready (with halos: one behind)
    total_spots: int  # spots of the whole slide (a progress bar's total)


def resolve_mpp(mpp: float | None, slide: Slide, sample: Sample | None = None) -> float:
    """Level-0 µm/px: the argument, else the spot sample's pixel size, else the file's, else an error."""
    value = mpp if mpp is not None else (sample.pixel_size_um if sample is not None else slide.embedded_mpp)
    if value is None:
        raise slide.unknown_mpp()
    if not (math.isfinite(value) and value > 0):
        raise He2stError(f"pixel size must be a positive number of µm/px, got {value}", slide.path)
    return float(value)


def check_slide_scale(config: PredictConfig) -> None:
    """Refuse a slide whose pixel size is unknown (no ``mpp``, none in the file, no ``spots_from``) before any
    work -- a ready-made model is not fetched or built for a slide that cannot be predicted."""
    if config.slide is None or config.mpp is not None or config.spots_from is not None:
        return
    with open_slide(Path(config.slide)) as slide:
        resolve_mpp(None, slide)


@dataclass
class GeneColumns:
    """The prediction's columns: their genes, in order, and where each comes from -- the model's panel
    prediction (``panel``: column, panel index) or its transcriptome bank (``bank``: column, bank index)."""

    genes: list[str]
    panel: tuple[np.ndarray, np.ndarray]
    bank: tuple[np.ndarray, np.ndarray]

    @property
    def beyond_panel(self) -> bool:
        return len(self.bank[0]) > 0


TRANSCRIPTOME_HINT = ("the model has no transcriptome bank: train a retrieval method with one, e.g. `he2st train "
                      "--method knn --set transcriptome_threshold=0.1`")


def select_genes(method: Method, genes: list[str] | None, transcriptome: bool = False) -> GeneColumns:
    """The requested genes (None: the panel; ``transcriptome``: the panel, then every other gene of the
    model's transcriptome bank), each from the panel when it is there, else from the transcriptome bank; a
    gene named twice is one column (an AnnData's genes must be unique for scanpy, `plot` and `report`)."""
    panel_genes = list(method.panel.genes)
    bank = method.transcriptome_bank
    bank_genes = list(bank.genes) if bank is not None else []
    if transcriptome:
        if genes is not None:
            raise He2stError("genes and transcriptome: name the genes or ask for the whole transcriptome bank, "
                             "not both")
        if bank is None:
            raise He2stError(f"--transcriptome: {TRANSCRIPTOME_HINT}")
        in_panel = set(panel_genes)
        genes = panel_genes + [g for g in bank_genes if g not in in_panel]
    elif genes is None:
        genes = panel_genes
    genes = list(dict.fromkeys(genes))
    if not genes:
        raise He2stError("no genes selected")
    panel_index = {g: i for i, g in enumerate(panel_genes)}
    bank_index = {g: i for i, g in enumerate(bank_genes)}
    missing = [g for g in genes if g not in panel_index and g not in bank_index]
    if missing:
        where = (f"the model's panel ({len(panel_genes)} genes, e.g. {', '.join(panel_genes[:5])})" if bank is None
                 else f"the model's panel ({len(panel_genes)} genes) nor its transcriptome bank ({len(bank_genes)} "
                      "genes)")
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = f"; {TRANSCRIPTOME_HINT}" if bank is None else ""
        raise He2stError(f"gene(s) {', '.join(missing[:5])}{more} are not in {where}{hint}")
    from_panel = [(c, panel_index[g]) for c, g in enumerate(genes) if g in panel_index]
    from_bank = [(c, bank_index[g]) for c, g in enumerate(genes) if g not in panel_index]

    def pairs(items: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([c for c, _ in items], dtype=np.int64), np.array([i for _, i in items], dtype=np.int64))

    return GeneColumns(list(genes), pairs(from_panel), pairs(from_bank))


def _halo_rows(tree: cKDTree, xy: np.ndarray, rows: np.ndarray, hops: tuple[int, ...]) -> np.ndarray:
    """``rows`` plus, hop by hop, every spot as close as the k-th nearest neighbour (ties included), sorted."""
    for k in hops:
        if len(rows) == 0:
            break
        kk = min(k + 1, tree.n)
        dist = tree.query(xy[rows], k=kk)[0].reshape(len(rows), kk)
        found = tree.query_ball_point(xy[rows], dist[:, -1] * (1 + 1e-9) + 1e-9)
        rows = np.unique(np.concatenate([rows, *[np.asarray(f, dtype=np.int64) for f in found]]))
    return rows


def run_prediction(
    config: PredictConfig, method: Method, *, encoder: Encoder | None = None,
    on_chunk: Callable[[ChunkInfo], None] | None = None, check_beside: Callable[[Path], object] | None = None,
) -> Path:
    """Predict ``method``'s genes over a slide; returns the written ``<out>/<library_id>.h5ad``.

    Spots: a hexagonal grid of ``pitch_um`` over detected tissue (or over ``mask``), or the spots of
    ``spots_from`` (a he2st sample ``.h5ad``; its image is used when ``slide`` is None and its pixel
    size when ``mpp`` is None). The slide is encoded with the encoder, stain normalisation, TTA and
    weights the model card records (``stain``, ``tta``, ``weights`` override); ``encoder`` replaces
    loading it by name (tests, custom weights). A rerun with identical inputs returns the existing
    file; an interrupted one resumes. Outputs that he2st did not write are refused unless
    ``config.overwrite``; another process predicting the same output is refused in one line naming it.
    ``check_beside`` is called with the output path where the outputs are checked, before any work: a caller
    that writes more beside it afterwards (the CLI's maps) refuses a foreign file there up front.
    """
    with overwriting(config.overwrite):
        return _run_prediction(config, method, encoder, on_chunk, check_beside)


def _run_prediction(config: PredictConfig, method: Method, encoder: Encoder | None,
                    on_chunk: Callable[[ChunkInfo], None] | None,
                    check_beside: Callable[[Path], object] | None = None) -> Path:
    trained_encoder, patch, trained = method.card.features(config.model)
    sample = Sample.load(config.spots_from) if config.spots_from is not None else None
    slide_path = config.slide
    if slide_path is None:
        if sample is None or sample.image_path is None:
            raise He2stError("no slide given (pass --slide, or --spots-from a sample that has an image)")
        slide_path = sample.image_path
    slide_path = Path(slide_path)
    stain = config.stain if config.stain is not None else trained.stain
    tta = config.tta if config.tta is not None else trained.tta
    weights = config.weights if config.weights is not None else trained.weights
    columns = select_genes(method, config.genes, config.transcriptome)
    method.coverage = config.coverage
    enc_cfg = EmbedConfig(encoder=trained_encoder.name, weights=weights, batch_size=config.batch_size,
                          device=config.device, precision=config.precision, runtime=config.runtime, stain=stain,
                          tta=tta)

    with open_slide(slide_path) as slide:
        mpp = resolve_mpp(config.mpp, slide, sample)
        if sample is None:
            check_pitch(config.pitch_um, mpp, slide_path)
        check_resolution(mpp, patch, slide_path, config.max_upsample, method.card.training_mpp,
                         option="--max-upsample", mpp_option="--mpp")
        thumb, scale = slide.thumbnail(config.thumbnail_px)
        grid, tissue_source = _spots(slide, thumb, scale, mpp, config.pitch_um, sample, config.mask)
        library_id = config.library_id or (sample.sample_id if sample is not None else name_from_stem(slide_path.stem))
        final = not_an_input(config.output(library_id), {"--spots-from": config.spots_from, "--slide": slide_path,
                                                         "--model": config.model, "--mask": config.mask})
        partial = final.with_suffix(".partial.h5")
        check_output(final)  # before any work: a foreign file here is refused, not found out at the end
        check_output(partial)
        if config.format == "zarr":
            check_output(final.with_suffix(".zarr"), folder=True)
        if check_beside is not None:
            check_beside(final)
        if encoder is None:
            encoder = load_encoder(enc_cfg)
            if config.weights is None:  # the card's own weights file: it must still hold what the model saw
                _check_weights(encoder.spec, method.card.weights_sha256, "encoder weights", f"the {method.card.method} model",
                              "restore that file or retrain", config.model, name_file=True)
        _check_encoder(encoder, trained_encoder, config.model)
        # a checkpoint file is identified by path, size and mtime; a method in memory by its tensors
        model_id = file_id(config.model) if config.model is not None else method_fingerprint(method)
        views = method.reads_views
        adapted = {v: adapted_encoder(method.card, v, config.model) for v in views if adapted_recipe(v) is not None}
        stamp = fingerprint({
            "model": model_id, "slide": file_id(slide_path), "mpp": round(mpp, 9),
            "patch": patch.model_dump(), "encoder": encoder.spec.model_dump_json(), "stain": stain, "tta": tta,
            "genes": columns.genes, "chunk": config.chunk,
            "xy": hashlib.sha1(np.ascontiguousarray(grid.xy).tobytes()).hexdigest(), "names": grid.names,
            "in_tissue": hashlib.sha1(np.ascontiguousarray(grid.in_tissue, np.int8).tobytes()).hexdigest(),
            "tissue": tissue_source, "thumbnail_px": config.thumbnail_px,
            "field": FIELD in views, "coverage": config.coverage if method.reliability is not None else None,
        } | arithmetic(enc_cfg) | ({"views": views} if set(views) - {FIELD} else {})
          | ({"adapted": {v: method.card.adapted_views[v]["weights_sha256"] for v in adapted}} if adapted else {}))
        if final.exists() and stored_fingerprint(final) == stamp:
            return _with_store(final, config)
        with output_lock(final):
            embedder = PatchEmbedder(encoder, enc_cfg, patch.size_px)
            others = view_embedders(views, encoder, enc_cfg, patch.size_px, embedder, adapted)
            check_view_encoders(method.card, others, config.model)
            width = encoder.embed_dim + sum(v.width for v in others)  # spot features, then each view's
            try:
                with writing(partial):
                    open_partial(partial, stamp, grid, len(columns.genes), width, config.chunk)
                    _run_chunks(slide, method, embedder, others, config.batch_size, grid, patch, mpp, library_id,
                                columns, partial, config.chunk, on_chunk)
                _finish(partial, final, stamp, method, config, encoder, embedder, patch, mpp, slide_path, sample,
                        tissue_source, grid, columns.genes, thumb, scale, library_id, stain, tta)
            except He2stError:  # bad input (or a full disk) found part-way: nothing to resume, space to free
                partial.unlink(missing_ok=True)
                raise
    return _with_store(final, config)


def _finish(partial: Path, final: Path, stamp: str, method: Method, config: PredictConfig, encoder: Encoder,
            embedder: PatchEmbedder, patch: PatchSpec, mpp: float, slide_path: Path, sample: Sample | None,
            tissue_source: str, grid: SpotGrid, genes: list[str], thumb: np.ndarray, scale: float,
            library_id: str, stain: str, tta: str) -> None:
    """The finished ``.h5ad`` from the partial file (which is then removed)."""
    meta = {
        "fingerprint": stamp, "target_transform": method.card.target_scale, "method": method.name,
        "model": "" if config.model is None else str(Path(config.model).resolve()),
        "card": method.card.model_dump_json(),
        "encoder": encoder.spec.name, "encoder_weights": encoder.spec.weights,
        "patch_spec": patch.model_dump_json(), "mpp": mpp, "slide": str(slide_path.resolve()),
        "spots": "hex_grid" if sample is None else f"sample:{sample.sample_id}", "tissue": tissue_source,
        "pitch_um": float(grid.pitch_um or 0.0), "spot_diameter_um": float(grid.spot_diameter_um),
        "trained_on": dict(method.card.training_samples), "stain": stain, "tta": tta,
        "runtime": embedder.runtime,
    }
    var = method.reliability.gene_columns(genes) if method.reliability is not None else {}
    write_h5ad(partial, final, grid, genes, thumb, scale, mpp, library_id, meta | {"coverage": config.coverage}, var)
    partial.unlink()
    warn_if_out_of_distribution(final)


def _with_store(final: Path, config: PredictConfig) -> Path:
    """With ``format="zarr"``, the SpatialData store ``<library_id>.zarr`` beside the .h5ad (made from it when
    missing, older or holding the other image); returns the .h5ad either way."""
    store = final.with_suffix(".zarr")
    if config.format == "zarr" and not store_is_current(store, final, config.zarr_image):
        write_spatialdata(final, store, config.zarr_image)
    return final


def _spots(slide: Slide, thumb: np.ndarray, scale: float, mpp: float, pitch_um: float, sample: Sample | None,
           mask: Path | None) -> tuple[SpotGrid, str]:
    """The spot grid and a note on where the tissue area came from."""
    tissue = None
    if mask is not None:
        tissue = load_mask(mask, shape=thumb.shape[:2], slide_size=slide.dimensions)
        source = f"mask:{Path(mask).resolve()}"
    if sample is not None:
        grid = grid_from_sample(sample)
        w, h = slide.dimensions
        _check_same_image(slide, sample)
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
    grid = hex_grid(tissue, scale, pitch_um, mpp, where=slide.path)
    if len(grid) == 0:
        raise He2stError(f"the tissue area holds no spot centre at a {pitch_um:g} µm pitch", slide.path)
    return grid, source


def _check_same_image(slide: Slide, sample: Sample) -> None:
    """A slide given beside ``--spots-from`` must be the image the sample's spots were placed on, or one of its
    size: the spots' pixel positions and the sample's µm/px are that image's, and on another scan of the
    section (the original slide instead of an export) they would cut patches at other places and scales."""
    own = sample.image_path
    if own is None or not Path(own).is_file() or Path(own).resolve() == Path(slide.path).resolve():
        return
    with open_slide(own) as image:
        placed = image.dimensions
    if tuple(placed) != tuple(slide.dimensions):
        raise He2stError(f"the spots of sample {sample.sample_id} are placed on its image {own} "
                         f"({placed[0]}x{placed[1]} px), not on this {slide.dimensions[0]}x{slide.dimensions[1]} slide; "
                         "pass that image, or predict this slide on its own spot grid (no --spots-from)", slide.path)


def _check_encoder(encoder: Encoder, trained: EncoderSpec, where: Path | None) -> None:
    if encoder.spec.name != trained.name or encoder.embed_dim != trained.embed_dim:
        raise He2stError(
            f"model was trained on {trained.embed_dim}-d features of encoder {trained.name!r}, "
            f"got encoder {encoder.spec.name!r} ({encoder.embed_dim}-d)", where)


def _run_chunks(slide: Slide, method: Method, embedder: PatchEmbedder, views: list[ViewEmbedder], batch_size: int,
                grid: SpotGrid, patch: PatchSpec, mpp: float, library_id: str, columns: GeneColumns, partial: Path,
                chunk: int, on_chunk: Callable[[ChunkInfo], None] | None) -> None:
    """Read (one chunk ahead, in a thread), embed and commit chunks; predict each chunk once the
    features of its neighbourhood halo (methods that read neighbouring spots) are committed. A method
    that predicts whole samples predicts every spot together once all are embedded (its memory then
    grows with the slide's spots). Genes beyond the panel are retrieved, for the same spots, from the
    model's transcriptome bank; their per-gene layers (intervals, for panel genes only) are NaN."""
    n = len(grid)
    n_genes = len(columns.genes)
    (panel_out, panel_in), (bank_out, bank_in) = columns.panel, columns.bank

    def place(values: np.ndarray, keep: np.ndarray, out: np.ndarray, index: np.ndarray, into: np.ndarray) -> None:
        into[:, out] = np.asarray(values, dtype=np.float32)[keep][:, index]

    n_chunks = (n + chunk - 1) // chunk
    hops = method.halo_hops
    whole = method.predicts_whole_samples
    keep_patches = method.uses_patches  # an encoder trained end to end reads its neighbours' patches too
    tree = cKDTree(grid.xy) if hops and not whole else None  # halos: chunk by chunk only
    reads_field = any(v.field for v in views)
    sides = [patch.field_um / mpp] + ([patch.context_field().field_um / mpp] if reads_field else [])
    # columns of the stored features: the spot's, then each view's
    bounds = np.cumsum([embedder.encoder.embed_dim] + [v.width for v in views])

    def read(i: int) -> tuple[list[np.ndarray], float]:
        """The chunk's spot patches (and context-field patches when the method reads them)."""
        start = time.perf_counter()
        xy = grid.xy[i * chunk : (i + 1) * chunk]
        patches = [read_patches(slide, xy, side, patch.size_px) for side in sides]
        return patches, time.perf_counter() - start

    def embed(run: PatchEmbedder, patches: np.ndarray) -> np.ndarray:
        return np.concatenate([run(patches[j : j + batch_size])[0] for j in range(0, len(patches), batch_size)])

    def predict(fh: h5py.File, i: int, features: np.ndarray | None, patches: np.ndarray | None) -> None:
        """Chunk ``i`` with its halo, or (``whole``) every spot, which then counts as all chunks."""
        a, b = (0, n) if whole else (i * chunk, min((i + 1) * chunk, n))
        rows = np.arange(n) if whole else _halo_rows(tree, grid.xy, np.arange(a, b), hops)
        if whole or features is None or len(rows) != b - a:
            features = fh["features"][:] if whole else fh["features"][rows]
            patches = fh["patches"][rows] if "patches" in fh else None
        blocks = zip(views, bounds[:-1], bounds[1:], strict=True)
        spots = SpotSet(sample_ids=np.full(len(rows), library_id, dtype=object),
                        barcodes=np.asarray([grid.names[r] for r in rows], dtype=object),
                        features=features[:, : bounds[0]], coords_um=grid.xy[rows] * mpp,
                        genes=list(method.panel.genes), patches=patches,
                        views={v.name: features[:, a:b] for v, a, b in blocks})
        pred = method.predict(spots)
        keep = np.searchsorted(rows, np.arange(a, b))  # the chunk's own rows within chunk + halo
        expression = np.full((b - a, n_genes), np.nan, np.float32)
        place(pred.expression, keep, panel_out, panel_in, expression)
        if columns.beyond_panel:
            place(method.retrieve(spots, method.transcriptome_bank).expression, keep, bank_out, bank_in, expression)
        fh["expression"][a:b] = expression
        for key, values in pred.layers.items():  # per spot and gene: the intervals (panel genes)
            if key not in fh:
                fh.create_dataset(key, shape=(n, n_genes), dtype=np.float32, fillvalue=np.nan)
                fh[key].attrs["kind"] = "layer"
            layer = np.full((b - a, n_genes), np.nan, np.float32)
            place(values, keep, panel_out, panel_in, layer)
            fh[key][a:b] = layer
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
        fh.attrs["predicted_chunks"] = n_chunks if whole else i + 1

    def ready(fh: h5py.File, i: int) -> bool:
        """Chunk ``i``'s halo lies in committed chunks (for ``whole``: every chunk is)."""
        if whole:
            return int(fh.attrs["embedded_chunks"]) == n_chunks
        if not hops:
            return int(fh.attrs["embedded_chunks"]) > i
        a, b = i * chunk, min((i + 1) * chunk, n)
        return int(_halo_rows(tree, grid.xy, np.arange(a, b), hops)[-1]) // chunk < int(fh.attrs["embedded_chunks"])

    with ThreadPoolExecutor(max_workers=1) as pool, h5py.File(partial, "a") as fh, torch.inference_mode():
        done = int(fh.attrs["embedded_chunks"])
        pending = pool.submit(read, done) if done < n_chunks else None
        for i in range(done, n_chunks):
            patches, read_s = pending.result()
            if i + 1 < n_chunks:
                pending = pool.submit(read, i + 1)
            a, b = i * chunk, min((i + 1) * chunk, n)
            t0 = time.perf_counter()
            features = np.concatenate([embed(embedder, patches[0])] + [
                embed(v.embedder, patches[1 if v.field else 0]) for v in views], axis=1)
            patches = patches[0]  # end-to-end methods read the spot patches only
            fh["features"][a:b] = features
            if keep_patches:  # kept beside the features, for halos and whole-sample prediction
                fh.require_dataset("patches", shape=(n, *patches.shape[1:]), dtype=np.uint8,
                                   chunks=(min(chunk, n), *patches.shape[1:]))[a:b] = patches
            fh.attrs["embedded_chunks"] = i + 1  # committed: the resume point for embedding
            t1 = time.perf_counter()
            while int(fh.attrs["predicted_chunks"]) < n_chunks and ready(fh, int(fh.attrs["predicted_chunks"])):
                j = int(fh.attrs["predicted_chunks"])
                predict(fh, j, features if j == i else None, patches if j == i else None)
            fh.flush()
            if on_chunk is not None:
                on_chunk(ChunkInfo(i, n_chunks, b - a, read_s, t1 - t0, time.perf_counter() - t1, n))
        while int(fh.attrs["predicted_chunks"]) < n_chunks:  # resumed after the last embedding
            predict(fh, int(fh.attrs["predicted_chunks"]), None, None)
        fh.flush()
