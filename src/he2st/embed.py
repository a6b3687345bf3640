"""``he2st embed``: frozen-encoder embeddings for every spot, computed once and reused.

Per sample and encoder, one HDF5 file holds ``embeddings`` (N x D float32), ``barcodes``, with
``embed.token_grid`` > 0 also ``tokens`` (N x g² x C float16: the spatial token map pooled to a small
grid, for token-level methods; from the un-augmented view when TTA is on) and, in attrs, the encoder spec, patch spec, stain normalisation and test-time augmentation used, so a
file can never be silently mixed with embeddings made another way. Work in progress lives in a
``.partial.h5`` file that records how many rows are done: an interrupted run continues from there,
and the final file appears (atomically renamed) only when every spot is embedded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from he2st.config import EmbedConfig
from he2st.data.patches import PatchCache, PatchSpec
from he2st.encoders import Encoder, create
from he2st.encoders.stain import make_stain_normalizer
from he2st.encoders.tta import embed_with_tta
from he2st.errors import He2stError

FORMAT = 1


def recipe(config: EmbedConfig, encoder: Encoder, cache: PatchCache) -> dict[str, str]:
    """The attrs that must match for an existing embedding file to be reused: how the vectors were
    computed, and from which patches (the cache's sample fingerprint changes with the sample)."""
    wanted = {
        "encoder_spec": encoder.spec.model_dump_json(),
        "patch_spec": cache.spec.model_dump_json(),
        "sample_fingerprint": str(cache.attrs.get("sample_fingerprint", "")),
        "stain": config.stain,
        "tta": config.tta,
        "precision": config.precision,
    }
    if config.token_grid:  # only then, so files made before token grids existed stay valid
        wanted["token_grid"] = str(config.token_grid)
    return wanted


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on GPUs by default (pathology FMs are trained/used in half precision), fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}[precision]


def ready_for_inference(
    encoder: Encoder, config: EmbedConfig
) -> tuple[torch.device, torch.dtype | None, Callable[[np.ndarray], np.ndarray] | None]:
    """Move ``encoder`` to the configured device in eval mode (channels-last on GPUs); returns that
    device, the autocast dtype and the stain normaliser (None: off), so every embedding path -- the
    patch cache and whole-slide prediction -- encodes tissue identically."""
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    encoder.to(device).eval()
    if device.type != "cpu":
        encoder.to(memory_format=torch.channels_last)
    stain = make_stain_normalizer(config.stain)[0] if config.stain != "none" else None
    return device, dtype, stain


class _PatchChunks(Dataset):
    """Chunks of uint8 patches read straight from the HDF5 cache (one h5 handle per worker)."""

    def __init__(self, path: Path, start: int, stop: int, chunk: int) -> None:
        self.path, self.start, self.stop, self.chunk = path, start, stop, chunk
        self._fh: h5py.File | None = None

    def __len__(self) -> int:
        return (self.stop - self.start + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        if self._fh is None:
            self._fh = h5py.File(self.path, "r")
        a = self.start + i * self.chunk
        return a, self._fh["img"][a : min(a + self.chunk, self.stop)]


@dataclass
class EmbedResult:
    path: Path
    n: int
    seconds: float  # time spent computing in this call (0 when reused)
    reused: bool


class EmbeddingFile:
    """Read access to a finished embedding file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise He2stError("embedding file not found; run `he2st embed`", self.path)
        try:
            with h5py.File(self.path, "r") as fh:
                self.embeddings = fh["embeddings"][:]
                self.barcodes = [b.decode() for b in fh["barcodes"][:]]
                self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
                self.has_tokens = "tokens" in fh
        except (OSError, KeyError) as exc:
            raise He2stError(f"not a readable embedding file ({type(exc).__name__}: {exc})", self.path) from exc

    def tokens(self) -> np.ndarray:
        """The cached token grid ``(N, g², C)`` as float32 (read on demand: it is the large part)."""
        if not self.has_tokens:
            raise He2stError("this embedding file has no token grid; embed with embed.token_grid > 0", self.path)
        with h5py.File(self.path, "r") as fh:
            return fh["tokens"][:].astype(np.float32)

    @property
    def encoder_spec(self) -> dict:
        return json.loads(self.attrs["encoder_spec"])


def embed_patches(
    encoder: Encoder, patches: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None,
    stain: Callable[[np.ndarray], np.ndarray] | None = None, tta: str = "none", token_grid: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Embed a batch of uint8 patches (B, H, W, 3) -> float32 (B, D), and with ``token_grid`` > 0 the
    token grid (B, g², C) from the same forward pass (a second pass of the plain view under TTA)."""
    if stain is not None:
        patches = stain(np.asarray(patches))
    x = encoder.preprocess(patches).to(device).contiguous(memory_format=torch.channels_last)
    tokens = None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if tta != "none":
            out = embed_with_tta(encoder, x, tta)
            if token_grid:
                tokens = encoder.grid_tokens(encoder.forward_features(x), token_grid)
        else:
            features = encoder.forward_features(x)
            out = encoder.pool(features)
            if token_grid:
                tokens = encoder.grid_tokens(features, token_grid)
    return out.float().cpu().numpy(), None if tokens is None else tokens.float().cpu().numpy()


def embed_cache(
    encoder: Encoder, cache: PatchCache, out: Path, config: EmbedConfig,
    on_progress: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed one patch cache into ``out`` (resuming a partial file made with the same recipe)."""
    wanted = recipe(config, encoder, cache)
    if out.exists():
        try:
            existing = EmbeddingFile(out)
            if all(existing.attrs.get(k) == v for k, v in wanted.items()) and existing.barcodes == cache.barcodes:
                return EmbedResult(out, len(existing.barcodes), 0.0, reused=True)
        except He2stError:
            pass  # unreadable: recompute
        out.unlink()  # the sample changed (or the file is corrupt): recompute
    partial = out.with_name(out.name + ".partial.h5")
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
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(partial, "w") as fh:
            fh.create_dataset("embeddings", shape=(n, dim), dtype=np.float32)
            fh.create_dataset("barcodes", data=np.array([b.encode() for b in cache.barcodes]))
            fh.attrs.update(wanted | {"format": FORMAT, "n_done": 0, "patch_cache": str(cache.path)})
    device, dtype, stain = ready_for_inference(encoder, config)
    loader = DataLoader(
        _PatchChunks(cache.path, done, n, config.batch_size), batch_size=None, shuffle=False,
        num_workers=config.num_workers, prefetch_factor=4 if config.num_workers else None,
        persistent_workers=False,
    )
    start_time = time.perf_counter()
    with h5py.File(partial, "a") as fh, torch.inference_mode():
        emb = fh["embeddings"]
        for start, batch in loader:
            vectors, tokens = embed_patches(encoder, batch, device, dtype, stain, config.tta, config.token_grid)
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
    seconds = time.perf_counter() - start_time
    os.replace(partial, out)
    return EmbedResult(out, n, seconds, reused=False)


def load_encoder(config: EmbedConfig) -> Encoder:
    return create(config.encoder, weights=config.weights)


@dataclass
class EmbedSummary:
    paths: dict[str, Path]
    n_embedded: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Patches per second over the patches actually computed in this run."""
        return self.n_embedded / self.seconds if self.seconds > 0 else float("nan")


def embed_workspace(
    workspace, sample_ids: list[str], patch: PatchSpec, config: EmbedConfig,
    on_progress: Callable[[int], None] | None = None, encoder: Encoder | None = None,
) -> EmbedSummary:
    """Embed the patch caches of ``sample_ids`` in a work folder; finished files are reused."""
    encoder = encoder or load_encoder(config)
    paths: dict[str, Path] = {}
    n_done, seconds = 0, 0.0
    for sid in sample_ids:
        cache = PatchCache(workspace.patch_path(sid, patch))
        cache.check(patch)
        result = embed_cache(encoder, cache, workspace.embedding_path(config, sid, patch), config, on_progress)
        paths[sid] = result.path
        if not result.reused:
            n_done += result.n
            seconds += result.seconds
    return EmbedSummary(paths, n_done, seconds)
