"""Where the tissue is on a slide thumbnail, and whether the slide is an H&E at all.

Whole-slide prediction only spends encoder time on spots that lie on tissue, so the mask decides
both cost and what the output covers. Stained tissue is coloured and glass is not, so the
mask is an Otsu threshold on HSV saturation. The thumbnail is usually at 3-10 µm/px. Things
that also carry colour or contrast are removed on purpose:

* near-black pixels (V < 0.15): scanner no-data areas, dark-field renderings, black ink;
* pen marks: green/cyan hues (H&E has none) and *strongly* saturated blue (sat > 0.8, above
  what hematoxylin reaches: on her2st the 99.9th percentile of blue tissue pixels is <= 0.78);
* specks (< 0.02 mm²) and, after a closing that joins pale stroma to its neighbours, holes
  smaller than 0.5 mm² are filled: Visium-like grids sample those too.

H&E check (documented rule, applied to the coloured pixels the threshold found):
  1. their mean saturation is >= 0.08 (a grayscale image has none), and
  2. at least half of them have a hue in the H&E arc 200°..360°..30° (blue-purple hematoxylin
     through pink eosin; fluorescence channels and pen ink are green/cyan or pure saturated blue),
     and pen-like pixels are not the majority, and
  3. their median brightness V is >= 0.3 (transmitted light: stained tissue is mid-tone; a
     fluorescence image is dark tissue with a few bright signals).
A slide with contrast but no colour is reported as "not H&E-like", one with neither as empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from he2st.errors import He2stError
from he2st.io import input_path

DARK_V = 0.15  # below: no-data / black ink, never tissue
MIN_TISSUE_SATURATION = 0.07  # floor on the Otsu threshold: glass-only slides stay empty
HE_MIN_MEAN_SATURATION = 0.08
HE_HUE_ARC_DEG = (200.0, 30.0)  # start, end (wrapping through 360)
HE_MIN_ARC_FRACTION = 0.5
HE_MIN_MEDIAN_V = 0.3
CLOSE_UM = 80.0  # closing radius: joins pale stroma between stained areas
MIN_OBJECT_MM2 = 0.02
MAX_HOLE_MM2 = 0.5
PEN_DILATE_UM = 20.0
DEFAULT_UM_PER_PX = 8.0  # what a 2000 px thumbnail of a ~16 mm slide is; used when unknown
WORK_UM_PER_PX = 4.0  # finer thumbnails are reduced to this for detection (same result, a fraction of the time)


@dataclass
class TissueStats:
    """What the H&E check looked at (reported in errors and stored with predictions)."""

    threshold: float
    tissue_fraction: float
    mean_saturation: float
    arc_fraction: float
    median_value: float
    mean_hue_deg: float
    largest_mm2: float = 0.0  # largest piece of coloured tissue before specks were dropped


def _pen_marks(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    hue = h * 360.0
    green_cyan = (hue >= 70) & (hue < 190) & (s > 0.25) & (v >= DARK_V)
    blue = (hue >= 190) & (hue < 250) & (s > 0.8) & (v >= DARK_V)
    return green_cyan | blue


def _in_arc(hue_deg: np.ndarray) -> np.ndarray:
    start, end = HE_HUE_ARC_DEG
    return (hue_deg >= start) | (hue_deg < end)


def _circular_mean_deg(hue: np.ndarray) -> float:
    angle = hue * 2 * np.pi
    return float(np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation by a Euclidean disk via a distance transform: cost independent of the radius."""
    return ndi.distance_transform_edt(~mask) <= radius if mask.any() else mask


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing by a disk (zero-padded, like ``binary_closing`` with border 0), in O(pixels)."""
    pad = int(math.ceil(radius)) + 1
    grown = _dilate(np.pad(mask, pad), radius)
    return (ndi.distance_transform_edt(grown) > radius)[pad:-pad, pad:-pad]


def _drop_small(mask: np.ndarray, min_px: float) -> tuple[np.ndarray, int]:
    """Remove connected components smaller than ``min_px`` (version-independent of skimage); also the largest
    component's pixels, so that a slide whose tissue was all dropped as specks can be told from an empty one."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask, 0
    area = np.bincount(labels.ravel())
    keep = area >= min_px
    keep[0] = False
    return keep[labels], int(area[1:].max())


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components smaller than ``max_px`` that do not touch the image border."""
    labels, n = ndi.label(~mask)
    if n == 0:
        return mask
    area = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = area < max_px
    small[0] = False
    small[border] = False
    return mask | small[labels]


def tissue_stats(rgb: np.ndarray, um_per_px: float | None = None) -> tuple[np.ndarray, TissueStats]:
    """Mask and the numbers behind it, without raising (see :func:`detect_tissue`)."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    hsv = rgb2hsv(rgb[..., :3])
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    upx = float(um_per_px or DEFAULT_UM_PER_PX)
    dark = v < DARK_V
    pen = _pen_marks(h, s, v)
    valid = ~dark & ~pen
    threshold = MIN_TISSUE_SATURATION
    if valid.any() and np.ptp(s[valid]) > 1e-3:
        threshold = max(float(threshold_otsu(s[valid])), MIN_TISSUE_SATURATION)
    coloured = ~dark & (s > threshold)  # pen included: used to judge whether this is an H&E
    raw = coloured & ~pen
    mask, largest_px = raw, 0
    if mask.any():
        mask = _close(mask, max(1.0, CLOSE_UM / upx))
        mask = _fill_holes(mask, MAX_HOLE_MM2 * 1e6 / upx**2)
        pen_zone = _dilate(pen, max(1.0, PEN_DILATE_UM / upx))
        mask, largest_px = _drop_small(mask & ~pen_zone & ~dark, MIN_OBJECT_MM2 * 1e6 / upx**2)
    judged = coloured if coloured.any() else np.zeros_like(coloured)
    n = max(int(judged.sum()), 1)
    stats = TissueStats(
        threshold=threshold,
        tissue_fraction=float(mask.mean()),
        mean_saturation=float(s[judged].mean()) if judged.any() else 0.0,
        arc_fraction=float((_in_arc(h[judged] * 360) & ~pen[judged]).sum() / n) if judged.any() else 0.0,
        median_value=float(np.median(v[judged])) if judged.any() else 0.0,
        mean_hue_deg=_circular_mean_deg(h[judged]) if judged.any() else float("nan"),
        largest_mm2=largest_px * upx**2 / 1e6,
    )
    return mask, stats


def _has_structure(rgb: np.ndarray) -> bool:
    """Contrast without colour: >= 2% of non-black pixels clearly darker than the bright background."""
    gray = np.asarray(rgb, dtype=np.float32)[..., :3].mean(axis=-1) / 255.0
    lit = gray[gray >= DARK_V]
    if lit.size == 0:
        return False
    background = np.percentile(lit, 95)
    return bool((lit < 0.85 * background).mean() > 0.02)


def detect_tissue(rgb: np.ndarray, um_per_px: float | None = None, where: str | Path | None = None) -> np.ndarray:
    """Boolean tissue mask of a thumbnail (same height x width).

    ``um_per_px`` is the thumbnail's pixel size; it sets the morphology in micrometres (unknown:
    8 µm/px is assumed). Raises :class:`He2stError` (naming ``where``) for a slide without tissue
    or one that is not H&E-like (see the module docstring for the rule).
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    factor = int(WORK_UM_PER_PX // um_per_px) if um_per_px else 1
    if factor >= 2:
        small = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).reduce(factor))
        mask, st = tissue_stats(small, um_per_px * factor)
        big = Image.fromarray(mask.astype(np.uint8) * 255).resize((rgb.shape[1], rgb.shape[0]),
                                                                  Image.Resampling.NEAREST)
        mask = np.asarray(big) > 127
    else:
        mask, st = tissue_stats(rgb, um_per_px)
    problems = _not_he(st)
    if not mask.any():
        if st.largest_mm2 > 0 and not problems:
            raise He2stError(
                f"the tissue found is too small: its largest piece covers {st.largest_mm2:.3g} mm², below the "
                f"{MIN_OBJECT_MM2:g} mm² under which a coloured patch is taken for a speck of dust or debris; "
                "pass --mask to choose the area", where)
        if st.arc_fraction < HE_MIN_ARC_FRACTION and st.mean_saturation >= HE_MIN_MEAN_SATURATION:
            raise He2stError(
                f"slide is not H&E-like: its coloured pixels are mostly pen-like or off-hue (mean hue "
                f"{st.mean_hue_deg:.0f}°; H&E is pink/purple, 200°-30°); fluorescence or another stain?", where)
        if _has_structure(rgb):
            raise He2stError(
                "slide is not H&E-like: it has structure but no stain colour (grayscale or fluorescence image?); "
                "he2st models need brightfield H&E", where)
        raise He2stError("no tissue found on the slide (empty or blank slide?); pass --mask to choose the area",
                         where)
    if problems:
        raise He2stError("slide is not H&E-like (grayscale, fluorescence or another stain?): " + "; ".join(problems),
                         where)
    return mask


def _not_he(st: TissueStats) -> list[str]:
    """Which of the H&E rules (module docstring) the coloured pixels break; empty when they look like H&E."""
    problems = []
    if st.mean_saturation < HE_MIN_MEAN_SATURATION:
        problems.append(f"mean saturation {st.mean_saturation:.2f} < {HE_MIN_MEAN_SATURATION}")
    if st.arc_fraction < HE_MIN_ARC_FRACTION:
        problems.append(f"only {st.arc_fraction:.0%} of tissue pixels are pink/purple (hue 200°-30°; "
                        f"mean hue {st.mean_hue_deg:.0f}°)")
    if st.median_value < HE_MIN_MEDIAN_V:
        problems.append(f"tissue is dark (median brightness {st.median_value:.2f} < {HE_MIN_MEDIAN_V})")
    return problems


def load_mask(path: str | Path, shape: tuple[int, int] | None = None,
              slide_size: tuple[int, int] | None = None) -> np.ndarray:
    """A user-drawn tissue mask (PNG or any Pillow image; non-zero / non-black = tissue).

    The mask must have the slide's aspect ratio (``slide_size`` = level-0 (width, height), 2%
    tolerance) and is resized (nearest) to ``shape`` = (height, width) of the thumbnail it is used with.
    """
    path = input_path(path, "mask file")
    try:
        with Image.open(path) as img:
            img.load()
            gray = np.asarray(img.convert("L"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise He2stError(f"not a readable mask image ({exc})", path) from exc
    h, w = gray.shape
    if slide_size is not None:
        sw, sh = slide_size
        if abs((w / h) / (sw / sh) - 1) > 0.02:
            raise He2stError(f"mask is {w}x{h} but the slide is {sw}x{sh}: aspect ratios differ", path)
    mask = gray > 127 if gray.max() > 1 else gray > 0
    if shape is not None and mask.shape != tuple(shape):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 127
    if not mask.any():
        raise He2stError("mask marks no tissue (all black)", path)
    return mask
