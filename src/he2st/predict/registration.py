"""Registration of one H&E section onto another: rigid, then affine, in micrometres.

Serial sections of one block are cut, floated and mounted one by one, so the same tissue lands at a
different place and angle on each slide, slightly stretched. Two stages with SimpleITK (optional extra
``registration``), on thumbnails at a few tens of µm per pixel (where the tissue outline and its
coarse texture live; finer detail only differs between sections):

1. **rigid** (rotation + translation) on the smoothed tissue masks, started from the masks' centres
   of mass at several angles (sections can be mounted turned by any angle), the best start kept;
2. **affine** on grey levels (tissue darkness, zero off tissue) with Mattes mutual information, from
   the rigid result. The affine result is kept only when it does not lower the masks' overlap (Dice):
   on sections whose texture disagrees the grey-level stage can drift, and the outline is the safer
   witness.

A transform maps points of the *fixed* section (µm) to the *moving* section (µm) -- the direction in
which images are resampled and in which a common grid on the fixed section is carried onto the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from he2st.errors import He2stError

START_ANGLES_DEG = tuple(range(0, 360, 30))  # rigid starts: mounting angle is unknown
SAMPLING_SEED = 1  # the metric's sample points; SimpleITK reads 0 (sitkWallClock) as "seed from the clock"


@dataclass(frozen=True)
class SectionImage:
    """A section as registration sees it: tissue mask and tissue darkness on one thumbnail."""

    mask: np.ndarray  # bool (h, w)
    grey: np.ndarray  # float32 (h, w), 0 (glass) .. 1 (darkest tissue)
    um_per_px: float

    @classmethod
    def from_rgb(cls, rgb: np.ndarray, mask: np.ndarray, um_per_px: float) -> SectionImage:
        """Darkness = 1 - luminance, kept on tissue only (glass, dust and shadows carry no alignment)."""
        luminance = np.asarray(rgb, dtype=np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32) / 255
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != luminance.shape:
            raise He2stError(f"tissue mask {mask.shape} and image {luminance.shape} differ in size")
        return cls(mask, np.where(mask, 1.0 - luminance, 0.0).astype(np.float32), float(um_per_px))


@dataclass(frozen=True)
class Affine:
    """``y = matrix @ x + offset`` on (x, y) points in µm."""

    matrix: np.ndarray  # (2, 2)
    offset: np.ndarray  # (2,)

    @classmethod
    def identity(cls) -> Affine:
        return cls(np.eye(2), np.zeros(2))

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy, dtype=np.float64) @ self.matrix.T + self.offset

    def then(self, other: Affine) -> Affine:
        """``other(self(x))``: chain fixed -> moving -> the moving section's own moving section."""
        return Affine(other.matrix @ self.matrix, other.matrix @ self.offset + other.offset)

    def inverse(self) -> Affine:
        inv = np.linalg.inv(self.matrix)
        return Affine(inv, -inv @ self.offset)

    def as_array(self) -> np.ndarray:
        """The 2x3 matrix ``[A | t]`` (what is stored with a stack)."""
        return np.hstack([self.matrix, self.offset[:, None]])


@dataclass(frozen=True)
class Registration:
    rigid: Affine
    affine: Affine  # the kept result (equal to ``rigid`` when the affine stage was refused)
    dice_before: float  # masks as mounted (identity)
    dice_rigid: float
    dice_after: float
    affine_kept: bool


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise He2stError("registering sections needs SimpleITK: pip install 'he2st[registration]'") from exc
    return sitk


def _image(sitk, values: np.ndarray, um_per_px: float):
    """``values`` as a SimpleITK image in µm: pixel (col, row) centred at ((col + .5) s, (row + .5) s).

    SimpleITK places a pixel's centre at ``origin + index * spacing``; with its default origin 0 a pixel would
    be centred on its top-left corner, half a thumbnail pixel off the frame in which :func:`warp_mask`, the
    stack's grid and the slides' own coordinates read a pixel as the square ``[col s, (col + 1) s)``. The
    transform found would then map points off by ``(I - A) s / 2`` (a whole pixel for a turn of 180°)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    image.SetSpacing((um_per_px, um_per_px))
    image.SetOrigin((um_per_px / 2, um_per_px / 2))
    return image


def _affine_of(transform) -> Affine:
    """SimpleITK's ``A (x - c) + c + t`` as ``A x + offset``."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(2, 2)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    return Affine(matrix, centre + translation - matrix @ centre)


def warp_mask(mask: np.ndarray, um_per_px: float, transform: Affine, shape: tuple[int, int],
              out_um_per_px: float) -> np.ndarray:
    """``mask`` (a moving section) resampled on a fixed section's pixel grid: fixed pixel -> µm ->
    ``transform`` -> moving µm -> nearest moving pixel (off the image: no tissue)."""
    rows, cols = np.indices(shape)
    xy = np.column_stack([(cols.ravel() + 0.5) * out_um_per_px, (rows.ravel() + 0.5) * out_um_per_px])
    src = np.floor(transform(xy) / um_per_px).astype(np.int64)
    inside = (src[:, 0] >= 0) & (src[:, 1] >= 0) & (src[:, 0] < mask.shape[1]) & (src[:, 1] < mask.shape[0])
    out = np.zeros(len(xy), dtype=bool)
    out[inside] = mask[src[inside, 1], src[inside, 0]]
    return out.reshape(shape)


def dice(fixed: SectionImage, moving: SectionImage, transform: Affine) -> float:
    """Overlap of the fixed mask and the moving mask carried onto it (1 = same outline)."""
    warped = warp_mask(moving.mask, moving.um_per_px, transform, fixed.mask.shape, fixed.um_per_px)
    total = fixed.mask.sum() + warped.sum()
    return float(2 * (fixed.mask & warped).sum() / total) if total else 0.0


def _method(sitk, metric: str, um_per_px: float, iterations: int = 200):
    reg = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(0.5, seed=SAMPLING_SEED)  # the same points on every run
    else:
        reg.SetMetricAsMeanSquares()
    reg.SetInterpolator(sitk.sitkLinear)
    # steps are lengths of the largest point shift (physical-shift scales): start at 4 thumbnail pixels,
    # stop below a hundredth of one
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=4 * um_per_px, minStep=0.01 * um_per_px,
                                                 numberOfIterations=iterations, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetNumberOfThreads(1)  # the metric's sums add up in one order: a rerun gives the same transform
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _smoothed(sitk, image, sigma: float):
    """Gaussian smoothing in one thread (as the registration itself: a rerun gives the same numbers)."""
    smoother = sitk.SmoothingRecursiveGaussianImageFilter()
    smoother.SetSigma(sigma)
    smoother.SetNumberOfThreads(1)
    return smoother.Execute(image)


def register_sections(fixed: SectionImage, moving: SectionImage) -> Registration:
    """Rigid (masks, several starting angles) then affine (grey levels) registration of ``moving`` onto
    ``fixed``; see the module docstring."""
    sitk = _sitk()
    if not fixed.mask.any() or not moving.mask.any():
        raise He2stError("cannot register a section without tissue")
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # every filter inside (pyramids, initialiser) in one
    try:  # thread: sums add up in one order, so a rerun gives the same transform to the last bit
        return _register(sitk, fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register(sitk, fixed: SectionImage, moving: SectionImage) -> Registration:
    smooth = [_smoothed(sitk, _image(sitk, s.mask, s.um_per_px), 2 * s.um_per_px) for s in (fixed, moving)]
    best, best_value = None, np.inf
    for angle in START_ANGLES_DEG:
        start = sitk.CenteredTransformInitializer(smooth[0], smooth[1], sitk.Euler2DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        start.SetAngle(np.radians(angle))
        reg = _method(sitk, "squares", fixed.um_per_px)
        reg.SetInitialTransform(start, inPlace=True)
        reg.Execute(*smooth)
        if reg.GetMetricValue() < best_value:
            best, best_value = start, reg.GetMetricValue()
    rigid = _affine_of(best)
    grey = [_image(sitk, s.grey, s.um_per_px) for s in (fixed, moving)]
    affine_start = sitk.AffineTransform(2)
    affine_start.SetCenter(best.GetCenter())
    affine_start.SetMatrix(best.GetMatrix())
    affine_start.SetTranslation(best.GetTranslation())
    reg = _method(sitk, "mattes", fixed.um_per_px)
    reg.SetInitialTransform(affine_start, inPlace=True)
    reg.Execute(*grey)
    affine = _affine_of(affine_start)
    d_rigid, d_affine = dice(fixed, moving, rigid), dice(fixed, moving, affine)
    kept = d_affine >= d_rigid
    return Registration(rigid, affine if kept else rigid, dice(fixed, moving, Affine.identity()), d_rigid,
                        d_affine if kept else d_rigid, kept)
