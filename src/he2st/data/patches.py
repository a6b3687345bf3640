"""Spot-centred image patches, defined in micrometres and cached per sample in HDF5.

A patch is a square field of view (default 112 µm, HEST's convention) resampled to a fixed pixel
size (default 224 px, i.e. 0.5 µm/px), so samples scanned at different resolutions feed the same
encoder the same physical scale. The cache (``img`` N x H x W x 3 uint8, ``coords``, ``barcode``)
is written atomically and reused when the settings and the sample are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from he2st.data.sample import Sample
from he2st.data.slide import read_patch
from he2st.errors import He2stError
from he2st.io import atomic_path

CACHE_FORMAT = 1


class PatchSpec(BaseModel):
    """How patches are cut: physical field of view and output size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field_um: float = Field(112.0, gt=0, description="side of the square field of view, µm")
    size_px: int = Field(224, gt=0, description="side of the stored patch, px")

    @property
    def pixel_size_um(self) -> float:
        return self.field_um / self.size_px

    @property
    def key(self) -> str:
        return f"{self.field_um:g}um_{self.size_px}px"


def sample_fingerprint(sample: Sample) -> str:
    """Changes whenever the spots, their positions, the image or its pixel size change."""
    h = hashlib.sha1()
    h.update("\n".join(sample.adata.obs_names).encode())
    h.update(np.ascontiguousarray(np.round(sample.spatial, 3)).tobytes())
    h.update(f"{sample.pixel_size_um:.6f}".encode())
    if sample.image_path is not None:
        st = Path(sample.image_path).stat()
        h.update(f"{Path(sample.image_path).name}:{st.st_size}".encode())
    return h.hexdigest()[:16]


def patch_cache_path(work_dir: str | Path, sample_id: str, spec: PatchSpec) -> Path:
    return Path(work_dir) / "patches" / f"{sample_id}__{spec.key}.h5"


class PatchCache:
    """Read access to one sample's patch file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise He2stError("patch cache not found; run `he2st prepare` first", self.path)
        try:
            with h5py.File(self.path, "r") as fh:
                self.barcodes = [b.decode() for b in fh["barcode"][:]]
                self.coords = fh["coords"][:]
                self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
            self.spec = PatchSpec(**json.loads(self.attrs["spec"]))
        except (OSError, KeyError, ValueError) as exc:
            raise He2stError(f"not a readable he2st patch cache ({type(exc).__name__}: {exc})", self.path) from exc

    def __len__(self) -> int:
        return len(self.barcodes)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Patches ``start:stop`` as uint8 (n, H, W, 3)."""
        with h5py.File(self.path, "r") as fh:
            return fh["img"][start:stop]

    def read_all(self) -> np.ndarray:
        return self.read()

    def check(self, spec: PatchSpec, fingerprint: str | None = None) -> None:
        """Refuse a cache cut with other settings (or from another version of the sample)."""
        if self.spec != spec:
            raise He2stError(
                f"patch cache was cut with {self.spec.key}, but {spec.key} was requested; "
                "run `he2st prepare` with the same patch settings",
                self.path,
            )
        if fingerprint is not None and self.attrs.get("sample_fingerprint") != fingerprint:
            raise He2stError("patch cache belongs to a different version of this sample; re-run prepare", self.path)


def extract_patches(
    sample: Sample,
    spec: PatchSpec,
    work_dir: str | Path,
    overwrite: bool = False,
    chunk: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Cut one patch per spot and store them; reuse an existing cache with identical settings."""
    path = patch_cache_path(work_dir, sample.sample_id, spec)
    fingerprint = sample_fingerprint(sample)
    if path.exists() and not overwrite:
        try:
            cache = PatchCache(path)
            if cache.attrs.get("sample_fingerprint") == fingerprint and cache.spec == spec:
                return path
        except He2stError:
            pass  # unreadable leftovers are rebuilt below
    slide = sample.slide
    side_px = spec.field_um / sample.pixel_size_um
    xy = sample.spatial
    n = len(xy)
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as fh:
            img = fh.create_dataset(
                "img", shape=(n, spec.size_px, spec.size_px, 3), dtype=np.uint8,
                chunks=(min(16, n), spec.size_px, spec.size_px, 3),
            )
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                img[start:stop] = np.stack(
                    [read_patch(slide, (xy[i, 0], xy[i, 1]), side_px, spec.size_px) for i in range(start, stop)]
                )
                if on_progress is not None:
                    on_progress(stop - start)
            top_left = np.round(xy - side_px / 2).astype(np.int64)
            fh.create_dataset("coords", data=top_left)  # top-left (x, y) in level-0 px, as HEST
            fh.create_dataset("barcode", data=np.array([b.encode() for b in sample.adata.obs_names]))
            fh.attrs.update(
                {
                    "format": CACHE_FORMAT,
                    "spec": spec.model_dump_json(),
                    "sample_id": sample.sample_id,
                    "sample_fingerprint": fingerprint,
                    "pixel_size": spec.pixel_size_um,
                    "source_pixel_size": sample.pixel_size_um,
                    "patch_size_src": side_px,
                    "patch_size_target": spec.size_px,
                    "image": str(sample.image_path),
                }
            )
    return path
