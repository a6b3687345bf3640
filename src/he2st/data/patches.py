"""Spot-centred image patches, defined in micrometres and cached per sample in HDF5.

A patch is a square field of view (default 112 µm, HEST's convention) resampled to a fixed pixel
size (default 224 px, i.e. 0.5 µm/px), so samples scanned at different resolutions feed the same
encoder the same physical scale. The cache (``img`` N x H x W x 3 uint8, ``coords``, ``barcode``)
is written atomically and reused when the settings and the sample are unchanged. The resolution
policy (:func:`check_resolution`) is shared by every step that reads patches from a slide.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from he2st.errors import He2stError, He2stWarning
from he2st.io import atomic_path, safe_name

if TYPE_CHECKING:  # annotations only: a PatchSpec (a model card's) needs neither anndata nor a slide reader
    from he2st.data.sample import Sample
    from he2st.data.slide import Slide

CACHE_FORMAT = 1
MAX_UPSAMPLE = 2.0  # upsampling beyond the coarsest training slide patches may apply (prepare warns past it)
BLOCK_PX = 2048  # side (level px) of the blocks patches are read in
DIGEST_BLOCKS = 16  # blocks of a slide's file read into a sample's fingerprint (:func:`image_digest`)
DIGEST_BLOCK_BYTES = 65_536
CONTEXT_FIELD_SCALE = 3.0  # the context field's side as a multiple of the spot field (TRIPLEX's global view)


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

    def context_field(self) -> PatchSpec:
        """The larger field cut around the same spot centres (:data:`CONTEXT_FIELD_SCALE` x the side, the
        same output size): the tissue around a spot, embedded once like the spot itself, for methods
        whose ``context_field`` option reads it."""
        return PatchSpec(field_um=self.field_um * CONTEXT_FIELD_SCALE, size_px=self.size_px)


def upsampling(mpp: float, patch: PatchSpec) -> float:
    """How much ``patch`` magnifies a slide of ``mpp`` µm/px (2.0: every slide pixel becomes 2 x 2)."""
    return mpp / patch.pixel_size_um


def allowed_upsampling(patch: PatchSpec, training_mpp: Iterable[float] = (),
                       tolerance: float = MAX_UPSAMPLE) -> float:
    """How far ``patch`` may upsample a slide for a model trained on slides of ``training_mpp`` µm/px:
    ``tolerance`` times the coarsest training slide's upsampling (1 when every training slide was at least
    as fine as the patches), so a slide no coarser than the training slides is never refused; ``tolerance``
    alone when the training resolution is not known."""
    seen = max((upsampling(m, patch) for m in training_mpp), default=1.0)
    return max(seen, 1.0) * tolerance


def _um_range(values: Iterable[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g} µm/px" if abs(hi - lo) <= 1e-9 * hi else f"{lo:g}-{hi:g} µm/px"


def too_coarse(mpp: float, patch: PatchSpec, max_upsample: float = MAX_UPSAMPLE,
               training_mpp: Iterable[float] | None = None, option: str | None = None,
               mpp_option: str | None = None) -> str | None:
    """The one resolution rule of prepare, evaluate, benchmark and predict: None when a slide of ``mpp``
    µm/px suits ``patch``, else why not (predict refuses such a slide; the others warn). ``training_mpp``
    (the model's training slides, predict only) is named in the reason: an empty list says it is unknown;
    ``option`` is the setting that would accept the slide, ``mpp_option`` the one that corrects a wrong
    pixel size (a file's recorded one is often a default, and a coarse slide is most often a wrong one)."""
    need = patch.pixel_size_um
    if upsampling(mpp, patch) <= max_upsample * 1.001:
        return None
    if training_mpp is None:
        seen = "anything the encoder saw"
    else:
        trained = list(training_mpp)
        seen = (f"the model's training slides ({_um_range(trained)})" if trained
                else "anything the model saw (its card records no training µm/px)")
    check = "the pixel size" if mpp_option is None else f"the pixel size (set it with {mpp_option})"
    return (f"slide pixel size {mpp:g} µm/px is too coarse for {patch.field_um:g} µm patches at {patch.size_px} px "
            f"({need:g} µm/px): they are upsampled {upsampling(mpp, patch):.1f}x, more than {max_upsample:g}x, so "
            f"they are blurrier than {seen} (the slide should be {need * max_upsample:g} µm/px or finer; check "
            + (f"{check}, or scan at higher magnification)" if option is None else
               f"{check}, scan at higher magnification, or set {option} to at least "
               f"{upsampling(mpp, patch):.3g})"))


def check_resolution(mpp: float, patch: PatchSpec, where: str | Path | None = None,
                     max_upsample: float | None = None, training_mpp: Iterable[float] = (),
                     option: str = "max_upsample", mpp_option: str = "mpp") -> None:
    """Refuse a slide too coarse for a model (:func:`too_coarse`): one trained on slides of ``training_mpp``
    µm/px accepts up to :func:`allowed_upsampling`, unless ``max_upsample`` (the ``option``) sets the limit;
    ``mpp_option`` is the setting that gives the pixel size."""
    trained = list(training_mpp)
    limit = max_upsample if max_upsample is not None else allowed_upsampling(patch, trained)
    problem = too_coarse(mpp, patch, limit, trained, option, mpp_option)
    if problem is not None:
        raise He2stError(problem, where)


def warn_if_too_coarse(sample: Sample, patch: PatchSpec) -> None:
    """The warning line prepare, evaluate and benchmark give for a sample :func:`too_coarse` for ``patch``."""
    problem = too_coarse(sample.pixel_size_um, patch)
    if problem is not None:
        warnings.warn(f"sample {sample.sample_id}: {problem}", He2stWarning, stacklevel=2)


def read_patches(slide: Slide, xy: np.ndarray, side_level0_px: float, out_px: int,
                 block_px: int = BLOCK_PX) -> np.ndarray:
    """Square patches of ``side_level0_px`` level-0 pixels centred on ``xy`` ``(n, 2)``, resampled to ``out_px``.

    Each patch is read at the coarsest pyramid level that is still at least the target resolution
    (top-left corner rounded half-to-even to a pixel of that level), then resized once (bilinear). Patches are
    read in blocks of about ``block_px`` level pixels, so neighbouring patches share one decode of the
    tiles they overlap: ``he2st prepare`` and whole-slide prediction both cut patches here, so a
    slide is cut exactly as the training samples were.
    """
    xy = np.asarray(xy, dtype=np.float64)
    out = np.empty((len(xy), out_px, out_px, 3), dtype=np.uint8)
    if len(xy) == 0:
        return out
    level = slide.best_level(side_level0_px / out_px)
    ds = slide.level_downsamples[level]
    size = max(1, round(side_level0_px / ds))
    # the level pixel nearest the top-left corner (half-to-even, as Python's round() in read_patch): flooring a
    # level-0 corner to a coarse level would shift every patch towards the top left by (ds - 1) / 2 level-0 px
    lxy = np.round((xy - side_level0_px / 2) / ds).astype(np.int64)
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


def sample_fingerprint(sample: Sample) -> str:
    """Changes whenever the spots, their positions, the image or its pixel size change."""
    h = hashlib.sha1()
    h.update("\n".join(sample.adata.obs_names).encode())
    h.update(np.ascontiguousarray(np.round(sample.spatial, 3)).tobytes())
    h.update(f"{sample.pixel_size_um:.6f}".encode())
    if sample.image_path is not None:
        st = Path(sample.image_path).stat()
        h.update(f"{Path(sample.image_path).name}:{st.st_size}".encode())
        h.update(image_digest(sample.image_path, st.st_size))
    return h.hexdigest()[:16]


def image_digest(path: str | Path, size: int | None = None) -> bytes:
    """SHA-1 of :data:`DIGEST_BLOCKS` blocks of :data:`DIGEST_BLOCK_BYTES` spread evenly over the file (the first
    and the last among them). The name and byte size alone do not tell images apart: an uncompressed TIFF
    re-exported under the same name (another scan, a stain-normalised copy) keeps both, and its stale patches
    would be reused. The modification time is left out, so a work folder copied elsewhere keeps its caches;
    a few blocks, not the whole file, so checking the cache of a multi-gigabyte slide stays instant."""
    size = Path(path).stat().st_size if size is None else size
    h = hashlib.sha1()
    span = max(size - DIGEST_BLOCK_BYTES, 0)
    starts = sorted({span * i // (DIGEST_BLOCKS - 1) for i in range(DIGEST_BLOCKS)})
    with open(path, "rb") as fh:
        for start in starts:
            fh.seek(start)
            h.update(fh.read(DIGEST_BLOCK_BYTES))
    return h.digest()


def patch_cache_path(work_dir: str | Path, sample_id: str, spec: PatchSpec) -> Path:
    return Path(work_dir) / "patches" / f"{safe_name(sample_id, 'sample id')}__{spec.key}.h5"


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
    chunk: int = 256,
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
                img[start:stop] = read_patches(slide, xy[start:stop], side_px, spec.size_px)
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
