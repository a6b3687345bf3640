"""Embeddings of HEST-Benchmark patch files, computed once per encoder recipe and cached.

Every patch of a task's ``.h5`` files goes through he2st's :class:`PatchEmbedder` (device, precision,
runtime, stain and TTA as ``EmbedConfig`` says) -- the same path as ``he2st embed``. A cached file has
he2st's embedding layout (:mod:`he2st.data.embeddings`) and records the recipe and the patch file's
path, size and modification time; any change recomputes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.hest_layout import BenchSample, iter_patch_images, read_patch_index
from he2st.encoders import Encoder
from he2st.encoders.inference import PatchEmbedder, load_encoder, precision_label
from he2st.encoders.weights import user_weights_sha256
from he2st.errors import He2stError
from he2st.io import atomic_path

#: (embeddings (N x D float32), barcodes) of one sample's patch file, rows in the file's order.
Features = Callable[[BenchSample], tuple[np.ndarray, list[str]]]


def recipe_folder(config: EmbedConfig) -> str:
    """A cache sub-folder per encoder, weights file and recipe, so recipes never overwrite each other."""
    parts = [config.encoder.replace("/", "_").replace(":", "_")]
    parts += [f"{k}-{v}" for k, v in (("stain", config.stain), ("tta", config.tta), ("precision", config.precision))
              if v not in ("none", "auto")]
    if config.weights is not None:
        parts.append("w-" + hashlib.sha1(str(Path(config.weights).resolve()).encode()).hexdigest()[:8])
    return "__".join(parts)


def source_stamp(path: Path) -> dict[str, str]:
    """What identifies a patch file's content cheaply: absolute path, size and modification time."""
    st = path.stat()
    return {"source": str(path.resolve()), "source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns)}


class CachedFeatures:
    """A :data:`Features` callable: cached embeddings under ``cache_dir/<recipe>/<task>/<sample>.h5``; the
    encoder is built on the first file that needs computing (none when every file is cached)."""

    def __init__(self, config: EmbedConfig, cache_dir: Path, task: str,
                 on_progress: Callable[[int], None] | None = None) -> None:
        self.config, self.folder, self.on_progress = config, cache_dir / recipe_folder(config) / task, on_progress
        self._encoder: Encoder | None = None
        self._embedders: dict[int, PatchEmbedder] = {}
        self.computed = 0  # patches embedded in this run (not read from the cache)

    def __call__(self, sample: BenchSample) -> tuple[np.ndarray, list[str]]:
        out = self.folder / f"{sample.sample_id}.h5"
        barcodes = read_patch_index(sample.patches)[0]
        wanted = self._recipe() | source_stamp(sample.patches)
        if out.exists():
            try:
                cached = EmbeddingFile(out)
                if all(cached.attrs.get(k) == v for k, v in wanted.items()) and cached.barcodes == barcodes:
                    return cached.embeddings.astype(np.float32), barcodes
            except He2stError:
                pass  # unreadable: recomputed below
        vectors = self._embed(sample.patches)
        if len(vectors) != len(barcodes):
            raise He2stError(f"{len(vectors)} patches but {len(barcodes)} barcodes", sample.patches)
        with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as fh:
            fh.create_dataset("embeddings", data=vectors)
            fh.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
            fh.attrs.update(wanted)
        return vectors, barcodes

    def _recipe(self) -> dict[str, str]:
        recipe = {"encoder_spec": self.encoder.spec.model_dump_json(), "stain": self.config.stain,
                  "tta": self.config.tta, "precision": precision_label(self.config)}
        checksum = user_weights_sha256(self.encoder.spec)  # the spec names the weights file, not what it holds
        return recipe | ({"weights_sha256": checksum} if checksum is not None else {})

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.config)
        return self._encoder

    def _embed(self, patches: Path) -> np.ndarray:
        parts = []
        for batch in iter_patch_images(patches, self.config.batch_size):
            size = batch.shape[1]
            if size not in self._embedders:
                self._embedders[size] = PatchEmbedder(self.encoder, self.config, size)
            parts.append(self._embedders[size](batch)[0].astype(np.float32))
            self.computed += len(batch)
            if self.on_progress is not None:
                self.on_progress(len(batch))
        if not parts:
            raise He2stError("patch file holds no patches", patches)
        return np.concatenate(parts)
