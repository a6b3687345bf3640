"""``he2st embed``: frozen-encoder embeddings for every spot, computed once and reused.

The file layout is :mod:`he2st.data.embeddings` (token grids come from the un-augmented view when TTA
is on). Besides each spot's own embedding, the spot's other views (:mod:`he2st.data.views`) are
embedded: the context field whenever ``he2st prepare`` cut it, and the views ``embed.views`` lists
(sub-spot tiles, other encoders, the encoder adapted by ``he2st adapt``). Work in progress lives in a
``.partial.h5`` file that records how many rows are done: an interrupted run continues from there,
and the final file appears (atomically renamed) only when every spot is embedded.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.views import FIELD, TILES, is_encoder_view, view_embed, view_patch, view_tiles
from he2st.encoders import Encoder
from he2st.encoders.inference import PatchEmbedder, load_encoder, precision_label
from he2st.encoders.weights import user_weights_sha256
from he2st.errors import He2stError
from he2st.io import check_output, make_folder, output_lock, record_output, writing
from he2st.workflows.engines import run_tasks

FORMAT = 1


def recipe(config: EmbedConfig, encoder: Encoder, cache: PatchCache, tiles: int = 1) -> dict[str, str]:
    """The attrs that must match for an existing embedding file to be reused: how the vectors were
    computed (``tiles``: sub-spot tiles per side; the weights by their sha256, since a file rewritten at
    the same path holds other weights), and from which patches (the cache's sample fingerprint changes
    with the sample)."""
    wanted = {
        "encoder_spec": encoder.spec.model_dump_json(),
        "patch_spec": cache.spec.model_dump_json(),
        "sample_fingerprint": str(cache.attrs.get("sample_fingerprint", "")),
        "stain": config.stain,
        "tta": config.tta,
        "precision": precision_label(config),
    }
    checksum = user_weights_sha256(encoder.spec)  # the spec names the weights file, not what it holds
    if checksum is not None:
        wanted["weights_sha256"] = checksum
    if config.token_grid:  # only then, so files made before token grids existed stay valid
        wanted["token_grid"] = str(config.token_grid)
    if tiles > 1:
        wanted["tiles"] = str(tiles)
    return wanted


def _patch_chunks(path: Path, start: int, stop: int, chunk: int, read_ahead: int) -> Iterator[tuple[int, np.ndarray]]:
    """Chunks of uint8 patches from the HDF5 cache, read ``read_ahead`` chunks ahead in a thread.

    A thread, not a worker process: reading an uncompressed chunk takes ~1% of encoding it, and on a
    small machine a second process pre-empts the runtime's compute threads (measured: half the rate
    with one DataLoader worker beside a 2-thread OpenVINO graph)."""
    with h5py.File(path, "r") as fh:
        images = fh["img"]
        starts = range(start, stop, chunk)
        if not read_ahead:
            yield from ((a, images[a : min(a + chunk, stop)]) for a in starts)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = deque(pool.submit(lambda a=a: images[a : min(a + chunk, stop)]) for a in starts[:read_ahead])
            for i, a in enumerate(starts):
                if i + read_ahead < len(starts):
                    b = starts[i + read_ahead]
                    pending.append(pool.submit(lambda b=b: images[b : min(b + chunk, stop)]))
                yield a, pending.popleft().result()


def finished(out: Path, wanted: dict[str, str], cache: PatchCache) -> bool:
    """``out`` exists, is readable and was made with the ``wanted`` recipe from this cache's spots."""
    if not out.exists():
        return False
    try:
        existing = EmbeddingFile(out)
    except He2stError:
        return False  # unreadable: recompute
    return all(existing.attrs.get(k) == v for k, v in wanted.items()) and existing.barcodes == cache.barcodes


@dataclass
class EmbedResult:
    path: Path
    n: int
    seconds: float  # time spent computing in this call (0 when reused)
    reused: bool


def embed_cache(
    encoder: Encoder | PatchEmbedder, cache: PatchCache, out: Path, config: EmbedConfig,
    on_progress: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed one patch cache into ``out`` (resuming a partial file made with the same recipe).

    Pass a :class:`PatchEmbedder` to reuse one (its runtime's graph is exported and validated once).
    The file records the runtime that ran the encoder; it is not part of the recipe, since every
    runtime gives the same numbers within :data:`he2st.encoders.runtime.FP32_TOLERANCE`."""
    embedder = encoder if isinstance(encoder, PatchEmbedder) else None
    encoder = embedder.encoder if embedder is not None else encoder
    wanted = recipe(config, encoder, cache, embedder.tiles if embedder is not None else 1)
    if finished(out, wanted, cache):
        return EmbedResult(out, len(cache), 0.0, reused=True)
    with output_lock(out, wait=True):  # another process embedding this sample: wait, then reuse its file
        if finished(out, wanted, cache):
            return EmbedResult(out, len(cache), 0.0, reused=True)
        return _embed_locked(embedder, encoder, cache, out, config, wanted, on_progress)


def _embed_locked(embedder: PatchEmbedder | None, encoder: Encoder, cache: PatchCache, out: Path,
                  config: EmbedConfig, wanted: dict[str, str], on_progress: Callable[[int], None] | None,
                  ) -> EmbedResult:
    partial = out.with_name(out.name + ".partial.h5")
    check_output(out)
    check_output(partial)
    out.unlink(missing_ok=True)  # the sample changed (or the file is corrupt): recompute
    embedder = embedder or PatchEmbedder(encoder, config, cache.spec.size_px, config.token_grid)
    n, dim = len(cache), encoder.embed_dim
    done = 0
    if partial.exists():
        try:
            with h5py.File(partial, "r") as fh:
                same = (all(fh.attrs.get(k) == v for k, v in wanted.items()) and fh["embeddings"].shape == (n, dim)
                        and [b.decode() for b in fh["barcodes"][:]] == cache.barcodes)
                done = int(fh.attrs["n_done"]) if same else -1
        except (OSError, KeyError):
            done = -1
        if done < 0:
            partial.unlink()
            done = 0
    if done == 0 and not partial.exists():
        make_folder(out.parent)
        record_output(partial)
        with h5py.File(partial, "w") as fh:
            fh.create_dataset("embeddings", shape=(n, dim), dtype=np.float32)
            fh.create_dataset("barcodes", data=np.array([b.encode() for b in cache.barcodes]))
            fh.attrs.update(wanted | {"format": FORMAT, "n_done": 0, "patch_cache": str(cache.path)})
    start_time = time.perf_counter()
    with writing(partial), h5py.File(partial, "a") as fh, torch.inference_mode():
        emb = fh["embeddings"]
        for start, batch in _patch_chunks(cache.path, done, n, config.batch_size, config.num_workers):
            vectors, tokens = embedder(batch)
            emb[start : start + len(vectors)] = vectors
            if tokens is not None:
                if "tokens" not in fh:  # its width is known once the encoder has run
                    fh.create_dataset("tokens", shape=(n, *tokens.shape[1:]), dtype=np.float16)
                fh["tokens"][start : start + len(tokens)] = tokens.astype(np.float16)
            fh.flush()  # rows on disk before the progress marker that vouches for them
            fh.attrs["n_done"] = start + len(vectors)  # committed progress: resume point
            fh.flush()
            if on_progress is not None:
                on_progress(len(vectors))
        fh.attrs["runtime"] = embedder.runtime
    seconds = time.perf_counter() - start_time
    record_output(out)
    os.replace(partial, out)
    return EmbedResult(out, n, seconds, reused=False)


@dataclass
class EmbedSummary:
    paths: dict[str, Path]
    n_embedded: int
    seconds: float
    runtimes: set[str]  # what ran the encoder (several only when patch sizes differ and one graph was refused)

    @property
    def throughput(self) -> float:
        """Patches per second over the patches actually computed in this run."""
        return self.n_embedded / self.seconds if self.seconds > 0 else float("nan")


def embed_workspace(
    workspace, sample_ids: list[str], patch: PatchSpec, config: EmbedConfig,
    on_progress: Callable[[int], None] | None = None, encoder: Encoder | None = None,
) -> EmbedSummary:
    """Embed the patch caches of ``sample_ids`` in a work folder (spot patches, the context field around
    them, the views ``config.views`` lists); finished files are reused. ``paths`` names each sample's
    spot-embedding file."""
    # another encoder on the same spot patches; found before any work (the adapted weights may be missing)
    others = [workspace.view_config(config, view) for view in filter(is_encoder_view, config.views)]
    summary = _embed_with(workspace, sample_ids, patch, config, True, on_progress, encoder)
    for other_config in others:
        other = _embed_with(workspace, sample_ids, patch, other_config, False, on_progress)
        summary.n_embedded += other.n_embedded
        summary.seconds += other.seconds
        summary.runtimes |= other.runtimes
    return summary


def _embed_with(workspace, sample_ids: list[str], patch: PatchSpec, config: EmbedConfig, with_views: bool,
                on_progress: Callable[[int], None] | None, encoder: Encoder | None = None) -> EmbedSummary:
    """The spot embeddings of ``config``'s encoder and, ``with_views``, the views it makes of the same
    spots (:func:`own_views`)."""
    embedders: dict[tuple[int, int], PatchEmbedder] = {}  # by patch size and tiles: one export per run
    paths: dict[str, Path] = {}
    n_done, seconds = 0, 0.0
    for sid in sample_ids:
        paths[sid] = workspace.embedding_path(config, sid, patch)
        for view in [None, *(own_views(workspace, sid, patch, config) if with_views else [])]:
            spec = patch if view is None else view_patch(patch, view)
            cfg = config if view is None else view_embed(config, view)
            tiles = 1 if view is None else view_tiles(view)
            out = paths[sid] if view is None else workspace.view_path(config, sid, patch, view)
            cache = PatchCache(workspace.patch_path(sid, spec))
            cache.check(spec)
            encoder = encoder or load_encoder(config)
            if finished(out, recipe(cfg, encoder, cache, tiles), cache):
                continue
            key = (spec.size_px, tiles)
            if key not in embedders:
                embedders[key] = PatchEmbedder(encoder, cfg, spec.size_px, cfg.token_grid, tiles)
            result = embed_cache(embedders[key], cache, out, cfg, on_progress)
            n_done += result.n
            seconds += result.seconds
    return EmbedSummary(paths, n_done, seconds, {e.runtime for e in embedders.values()})


def own_views(workspace, sample_id: str, patch: PatchSpec, config: EmbedConfig) -> list[str]:
    """The views of a sample's spots :func:`embed_workspace` makes with their own encoder: the context
    field when ``he2st prepare`` cut it, and the sub-spot tiles when ``config.views`` lists them."""
    field = workspace.patch_path(sample_id, patch.context_field()).exists()
    return ([FIELD] if field else []) + ([TILES] if TILES in config.views else [])


def patches_to_embed(workspace, sample_ids: list[str], patch: PatchSpec, config: EmbedConfig) -> int:
    """How many patches :func:`embed_workspace` goes through (a progress bar's total; a spot's tiles count
    as one patch)."""
    encoders = 1 + sum(map(is_encoder_view, config.views))
    return sum(workspace.load_sample(s).n_spots * (encoders + len(own_views(workspace, s, patch, config)))
               for s in sample_ids)


@dataclass
class SampleOutcome:
    sample: str
    status: str  # "done" or "failed"
    n_embedded: int
    seconds: float
    error: str


def embed_one(work_dir: str, sample_id: str, patch: PatchSpec, config: EmbedConfig, threads: int) -> SampleOutcome:
    """Embed one sample of a work folder (in a worker): its outcome, never an exception."""
    torch.set_num_threads(threads)
    try:
        from he2st.data.workspace import Workspace

        summary = embed_workspace(Workspace(work_dir), [sample_id], patch, config)
        return SampleOutcome(sample_id, "done", summary.n_embedded, summary.seconds, "")
    except Exception as exc:  # noqa: BLE001 - a failing sample is recorded, the others go on
        return SampleOutcome(sample_id, "failed", 0, 0.0, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def embed_many(workspace, sample_ids: list[str], patch: PatchSpec, config: EmbedConfig, engine: str, workers: int,
               address: str | None = None, on_done: Callable[[SampleOutcome], None] | None = None,
               ) -> list[SampleOutcome]:
    """One task per sample on ``engine`` (see :mod:`he2st.workflows.engines`); outcomes in input order. The
    files are those :func:`embed_workspace` writes, so a later run reuses them."""
    return run_tasks(embed_one, [(str(workspace.root), sid, patch, config) for sid in sample_ids], engine, workers,
                     address, on_done)

