"""Lazy access to H&E images of any size: whole-slide formats, pyramidal TIFFs and plain JPEG/PNG.

Every backend answers the same question -- "give me this level-0 rectangle at this level, as RGB
uint8" -- so patch extraction and whole-slide prediction never care which file format they got.
Regions that leave the image are padded with white (slide background) instead of failing, because
spots near the tissue edge are real data.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from he2st.errors import He2stError
from he2st.io import file_type, input_path

if TYPE_CHECKING:
    import tifffile

# Largest plain (non-tiled) image we agree to decode. Pillow's default bomb guard (~89 Mpx) trips on
# ordinary ST images (her2st JPEGs are ~92 Mpx); we raise the limit for our own reads only.
PLAIN_IMAGE_MAX_PIXELS = 1_500_000_000
_PIL_LIMIT_LOCK = threading.Lock()

# Pixels of one pyramid level decoded at once for a thumbnail (~190 MB as RGB).
THUMBNAIL_BAND_PIXELS = 64_000_000

WHOLE_SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf"}
PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
# Largest pixel size (µm/px) a file may record and be believed. 50 µm/px is already coarser than half a Visium
# spot and ~12x a 2.5x objective's scan; what does exceed it are the defaults written by tools that never knew
# the scale (72 / 96 dpi = 352.8 / 264.6 µm/px, libvips' 10 px/cm = 1000 µm/px), so such a value means unknown.
MAX_PLAUSIBLE_MPP = 50.0
# Micrometres per OME-XML length unit (the schema's UnitsLength symbols a slide's pixel size can come in).
_OME_UM_PER_UNIT = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _on_white(pixels: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """RGB uint8 of an RGB or RGBA array, alpha composited on white: a transparent pixel holds no data, which is
    slide background, as openslide's backend and the padding outside the image read it (not black, which the
    tissue mask and the patches of edge spots would take for dark tissue). ``premultiplied``: the colour is
    already scaled by alpha (a TIFF's associated alpha)."""
    if pixels.shape[-1] < 4:
        return pixels[..., :3]
    rgb, alpha = pixels[..., :3].astype(np.uint16), pixels[..., 3:4].astype(np.uint16)
    white = 255 - alpha
    mixed = rgb + white if premultiplied else (rgb * alpha + 255 * white + 127) // 255
    return np.minimum(mixed, 255).astype(np.uint8)


@contextlib.contextmanager
def _raised_pil_limit() -> Iterator[None]:
    """Pillow's bomb limit raised to ours for the duration of one read, then restored."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = PLAIN_IMAGE_MAX_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


class Slide(ABC):
    """An RGB image pyramid addressed in level-0 pixels."""

    path: Path
    level_dimensions: list[tuple[int, int]]  # (width, height) per level

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        w0 = self.level_dimensions[0][0]
        return [w0 / w for w, _ in self.level_dimensions]

    @property
    def recorded_mpp(self) -> float | None:
        """Pixel size written in the file (µm/px) as it stands, plausible or not; None when it records none."""
        return None

    @property
    def embedded_mpp(self) -> float | None:
        """:attr:`recorded_mpp` when it is plausible for a slide scan (:data:`MAX_PLAUSIBLE_MPP`), else None
        (unknown). Sample metadata takes precedence."""
        mpp = self.recorded_mpp
        return mpp if mpp is not None and 0 < mpp <= MAX_PLAUSIBLE_MPP else None

    def unknown_mpp(self) -> He2stError:
        """The one-line refusal of a slide whose pixel size is unknown, saying when the file records an
        implausible one (a screen default) rather than none."""
        recorded = self.recorded_mpp
        what = ("the slide does not record its pixel size" if recorded is None else
                f"the slide records {recorded:g} µm/px, a screen or editor default rather than a scan's pixel size")
        return He2stError(f"{what}; pass --mpp (µm per level-0 pixel)", getattr(self, "path", None))

    def best_level(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed ``downsample`` (never lose resolution)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = i
        return best

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) region; (x, y) = top-left in level-0 px, size in level px.

        Parts outside the image are white.
        """
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lw), min(ly + height, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._decoded(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _decoded(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """:meth:`_read_inside`, with a damaged file (a truncated copy, a corrupt tile) said in one line naming it."""
        try:
            return self._read_inside(level, x, y, width, height)
        except He2stError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders (JPEG, LZW, openslide, ...) raise many types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise He2stError(f"image data cannot be decoded: truncated or corrupt ({type(exc).__name__}"
                             f"{': ' + text if text else ''})", getattr(self, "path", None)) from exc

    @abstractmethod
    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read a rectangle fully inside ``level`` (coordinates in level px)."""

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """A downsampled RGB view and its scale factor (thumbnail px per level-0 px).

        The nearest pyramid level is read in bands of rows, each shrunk as it is read: a slide without a
        pyramid (a tiled TIFF of one level) would otherwise be decoded whole, gigabytes for a 40,000 px side."""
        w0, h0 = self.dimensions
        scale = min(1.0, max_side / max(w0, h0))
        level = self.best_level(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
        rows_per_band = max(1, THUMBNAIL_BAND_PIXELS // lw, math.ceil(lh / size[1]))
        bands = []
        for top in range(0, lh, rows_per_band):
            bottom = min(lh, top + rows_per_band)
            first, last = round(top * size[1] / lh), round(bottom * size[1] / lh)
            if last > first:  # a band may round to no output row at all: it is skipped, not read
                band = Image.fromarray(self._decoded(level, 0, top, lw, bottom - top))
                bands.append(np.asarray(band.resize((size[0], last - first), Image.Resampling.BILINEAR)))
        return np.concatenate(bands), scale

    def close(self) -> None:  # noqa: B027 - optional for backends without handles
        """Release file handles."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSlideSlide(Slide):
    """Vendor whole-slide formats and pyramidal TIFFs through openslide."""

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise He2stError(f"openslide cannot read this slide ({exc})", path) from exc
        self.level_dimensions = [tuple(d) for d in self._osr.level_dimensions]

    @property
    def recorded_mpp(self) -> float | None:
        mpp = self._osr.properties.get("openslide.mpp-x")
        return float(mpp) if mpp else None

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        rgba = self._osr.read_region((round(x * ds), round(y * ds)), level, (width, height))
        return _on_white(np.asarray(rgba))  # transparent = no data = background

    def close(self) -> None:
        self._osr.close()


class TiffFileSlide(Slide):
    """TIFFs through tifffile: a tiled page (pyramidal, OME or SubIFD) decodes only the tiles needed; a strip
    page is decoded whole on first access, as Pillow would, but its resolution tags and OME-XML are kept."""

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            self._pages = [level.keyframe for level in series.levels]
        except Exception as exc:  # tifffile raises many types for corrupt files
            raise He2stError(f"not a readable TIFF ({exc})", path) from exc
        for page in self._pages:
            colours = page.photometric.name if hasattr(page.photometric, "name") else str(page.photometric)
            if colours not in ("RGB", "YCBCR"):  # CMYK's first three samples are not red, green and blue
                what = {"SEPARATED": "CMYK (separated)", "MINISBLACK": "grayscale", "MINISWHITE": "grayscale",
                        "PALETTE": "palette"}.get(colours, colours)
                raise He2stError(f"expected an RGB TIFF, got {what} colour; convert it to RGB", path)
            if page.samplesperpixel not in (3, 4) or page.dtype != np.uint8:
                raise He2stError(f"expected an 8-bit RGB TIFF, got {page.samplesperpixel} sample(s) per pixel of "
                                 f"{page.dtype}", path)
            if not page.is_tiled and page.imagewidth * page.imagelength > PLAIN_IMAGE_MAX_PIXELS:
                raise He2stError(f"untiled image has more than {PLAIN_IMAGE_MAX_PIXELS:,} pixels; convert it to a "
                                 "tiled pyramidal TIFF", path)
        self.level_dimensions = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        # per level: its 4th sample is alpha (None: no alpha, or an unspecified extra sample, which is dropped)
        self._alpha = [_tiff_alpha(p) for p in self._pages]
        self._lock = threading.Lock()
        self._untiled: dict[int, np.ndarray] = {}

    @property
    def recorded_mpp(self) -> float | None:
        """The OME-XML's PhysicalSizeX (the more specific record: OME writers often leave the resolution tags
        at a default), else the level-0 page's XResolution in its ResolutionUnit."""
        ome = _ome_mpp(self._tif.ome_metadata)
        return ome if ome is not None else self._resolution_mpp()

    def _resolution_mpp(self) -> float | None:
        page = self._pages[0]
        tag = page.tags.get("XResolution")
        unit = page.tags.get("ResolutionUnit")
        if tag is None or unit is None:
            return None
        num, den = tag.value
        per_unit = num / den if den else 0
        um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))
        return um_per_unit / per_unit if per_unit and um_per_unit else None

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        if not page.is_tiled:
            if level not in self._untiled:
                with self._lock:  # asarray seeks the file handle that tile reads share
                    pixels = page.asarray()
                    self._untiled[level] = self._rgb(level, np.moveaxis(pixels, 0, -1) if _is_planar(page) else pixels)
            return self._untiled[level][y : y + height, x : x + width]
        tw, th = page.tilewidth, page.tilelength
        n_across = math.ceil(page.imagewidth / tw)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(y // th, (y + height - 1) // th + 1):
            for tx in range(x // tw, (x + width - 1) // tw + 1):
                tile = self._tile(level, ty * n_across + tx)
                gx0, gy0 = tx * tw, ty * th
                sx0, sy0 = max(x, gx0), max(y, gy0)
                sx1, sy1 = min(x + width, gx0 + tw), min(y + height, gy0 + th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]
        return out

    def _tile(self, level: int, index: int) -> np.ndarray:
        """Tile ``index`` of ``level`` as RGB. A planar-separate page stores each sample's plane as its own run
        of tiles (plane ``s`` of tile ``index`` is segment ``index + s * tiles per plane``): all are read, or
        the image would be its red plane only."""
        page = self._pages[level]
        if not _is_planar(page):
            return self._rgb(level, self._segment(page, index, page.samplesperpixel))
        per_plane = len(page.dataoffsets) // page.samplesperpixel
        planes = [self._segment(page, index + s * per_plane, 1) for s in range(page.samplesperpixel)]
        return self._rgb(level, np.concatenate(planes, axis=-1))

    def _segment(self, page: tifffile.TiffPage, index: int, samples: int) -> np.ndarray:
        """Segment ``index`` of ``page`` decoded to (tile height, tile width, ``samples``). A segment of byte count
        0 was never written -- legal in a sparse TIFF, which leaves empty background out -- and is white: it is
        background (tifffile's own fill, 0, would read as black tissue)."""
        count = page.databytecounts[index]
        if not count:
            return np.full((page.tilelength, page.tilewidth, samples), 255, dtype=np.uint8)
        with self._lock:
            self._tif.filehandle.seek(page.dataoffsets[index])
            data = self._tif.filehandle.read(count)
        tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
        return np.asarray(tile).reshape(page.tilelength, page.tilewidth, samples)

    def _rgb(self, level: int, pixels: np.ndarray) -> np.ndarray:
        """Decoded samples of ``level`` as RGB, its alpha (if any) composited on white."""
        alpha = self._alpha[level]
        return pixels[..., :3] if alpha is None else _on_white(pixels[..., :4], premultiplied=alpha == "associated")

    def close(self) -> None:
        self._tif.close()


def _is_planar(page: tifffile.TiffPage) -> bool:
    """Whether ``page`` stores each sample as its own plane (PlanarConfiguration 2) rather than interleaved."""
    return int(page.planarconfig) == 2


def _tiff_alpha(page: tifffile.TiffPage) -> str | None:
    """``"associated"`` (premultiplied) or ``"unassociated"`` when a 4-sample page's extra sample is alpha."""
    extra = tuple(page.extrasamples or ())
    if page.samplesperpixel < 4 or not extra:
        return None
    return {1: "associated", 2: "unassociated"}.get(int(extra[0]))


def _ome_mpp(xml: str | None) -> float | None:
    """µm/px from the first image's ``PhysicalSizeX`` (or ``PhysicalSizeY``) in OME-XML, in its unit (µm when
    the unit is not given, as the OME schema defaults); None when absent, unparsable or in an unknown unit."""
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    for axis in ("X", "Y"):
        size, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if size is None:
            continue
        try:
            value = float(size) * _OME_UM_PER_UNIT[unit]
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) and value > 0 else None
    return None


@contextlib.contextmanager
def _open_plain(path: Path) -> Iterator[Image.Image]:
    """A plain image, gunzipped on the fly when its name ends in ``.gz``."""
    if path.suffix.lower() != ".gz":
        with Image.open(path) as img:
            yield img
        return
    with gzip.open(path) as fh, Image.open(fh) as img:
        yield img


class PlainImageSlide(Slide):
    """JPEG/PNG images: one level, decoded once on first access (these formats are not tiled). A gzipped
    one (``.png.gz``, as GEO ships Space Ranger's images) is read through the decompressor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with _raised_pil_limit(), _open_plain(path) as img:
                self.level_dimensions = [img.size]
        except Image.DecompressionBombError as exc:
            raise He2stError(
                f"image has more than {PLAIN_IMAGE_MAX_PIXELS:,} pixels; convert it to a tiled pyramidal TIFF", path
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise He2stError(f"not a readable image ({exc})", path) from exc
        self._pixels: np.ndarray | None = None

    def _decode(self, reduce: int = 1) -> np.ndarray:
        try:
            with _raised_pil_limit(), _open_plain(self.path) as img:
                if reduce > 1:
                    img.draft("RGB", (img.size[0] // reduce, img.size[1] // reduce))
                if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
                    return _on_white(np.asarray(img.convert("RGBA")))
                return np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise He2stError(f"image is truncated or corrupt ({exc})", self.path) from exc

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = self._decode()
        return self._pixels[y : y + height, x : x + width]

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        if self._pixels is not None:
            return super().thumbnail(max_side)
        w0, h0 = self.dimensions
        scale = min(1.0, max_side / max(w0, h0))
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 size directly: a thumbnail without the full decode.
        small = Image.fromarray(self._decode(reduce=max(1, int(1.0 / scale))))
        size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
        return np.asarray(small.resize(size, Image.Resampling.BILINEAR)), scale

    def close(self) -> None:
        self._pixels = None


def open_slide(path: str | Path) -> Slide:
    """Open an image with the backend that suits its format; errors name the file."""
    path = input_path(path, "image file")
    suffix = path.suffix.lower()
    if suffix in PLAIN_SUFFIXES or (suffix == ".gz" and Path(path.stem).suffix.lower() in PLAIN_SUFFIXES):
        return PlainImageSlide(path)
    vendor = _openslide_vendor(path)
    if suffix in TIFF_SUFFIXES:
        if vendor not in (None, "generic-tiff"):
            # Aperio, Philips, Ventana, ... named .tif: only openslide reads their pyramid and pixel size.
            return OpenSlideSlide(path)
        if "TIFF" in file_type(path):
            # Tiled or not, tifffile reads the resolution tags and OME-XML that Pillow would drop. Its refusal of
            # a layout it cannot read as RGB stands: openslide would read such a file as one gray channel.
            return TiffFileSlide(path)
    return _open_with_openslide(path, vendor)  # also a JPEG or PNG named .tif


def _openslide_vendor(path: Path) -> str | None:
    """openslide's name for the format of ``path`` (``"aperio"``, ``"generic-tiff"``, ...); None when it is not
    a slide openslide knows, or openslide is not installed."""
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - any failure means "not a slide"
        return None


def _open_with_openslide(path: Path, vendor: str | None) -> Slide:
    """``path`` through openslide when it knows the format (``vendor``), else as a plain image."""
    if vendor is None:
        # Not a whole-slide format: maybe a plain image with an unusual suffix.
        try:
            return PlainImageSlide(path)
        except He2stError as exc:
            raise He2stError(f"not a readable image or whole-slide file (it is {file_type(path)})", path) from exc
    return OpenSlideSlide(path)


def read_patch(
    slide: Slide, center_xy: tuple[float, float], side_level0_px: float, out_px: int
) -> np.ndarray:
    """A square patch of ``side_level0_px`` level-0 pixels centred on ``center_xy``, resampled to ``out_px``.

    The pyramid level is chosen so that we read at no less than the target resolution, then resize
    once (antialiased when shrinking).
    """
    downsample = side_level0_px / out_px
    level = slide.best_level(downsample)
    ds = slide.level_downsamples[level]
    x0 = center_xy[0] - side_level0_px / 2
    y0 = center_xy[1] - side_level0_px / 2
    size = max(1, round(side_level0_px / ds))
    # the level pixel nearest the corner; (p + 0.5) * ds is level pixel p under read_region's floor(x / ds)
    lx, ly = round(x0 / ds), round(y0 / ds)
    region = slide.read_region((lx + 0.5) * ds, (ly + 0.5) * ds, level, size, size)
    if size == out_px:
        return region
    return np.asarray(Image.fromarray(region).resize((out_px, out_px), Image.Resampling.BILINEAR))
