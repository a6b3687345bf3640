"""Stain normalisation of H&E patches (Macenko, Reinhard) against a fixed reference.

Stain colour varies between labs, scanners and staining batches, and encoders trained on
one colour distribution embed another one differently. Mapping every patch onto one fixed
reference before encoding removes much of that batch effect. The reference is fixed (fit
once) rather than per dataset so embeddings from different runs stay comparable, and each
normaliser has a JSON description that embedding files record.

Both methods work on uint8 RGB arrays, ``(H, W, 3)`` or ``(N, H, W, 3)``, estimate the
source statistics per image, leave near-white background untouched, and are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from skimage.color import lab2rgb, rgb2lab

from he2st.errors import He2stError

StainKind = Literal["none", "macenko", "reinhard"]

# Reference H&E optical-density stain vectors (columns: haematoxylin, eosin) and the 99th
# percentile stain concentrations of the reference slide, from Macenko et al. (ISBI 2009).
REFERENCE_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
REFERENCE_MAX_CONCENTRATIONS = (1.9705, 1.0308)

_BACKGROUND_INTENSITY = 255.0
_DEFAULT_BETA = 0.15  # optical density below which a channel counts as transparent
_DEFAULT_ALPHA = 1.0  # percentile of stain-vector angles taken as the pure stains
# Fewer tissue pixels than this give unstable statistics; such images are returned unchanged.
_MIN_TISSUE_PIXELS = 500


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer-Lambert optical density ``-ln(I / 255)`` per channel (white -> 0)."""
    return -np.log(np.maximum(rgb.astype(np.float64), 1.0) / _BACKGROUND_INTENSITY)


def render_stains(concentrations: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """uint8 RGB image of stain ``concentrations`` (``(..., 2)``) under ``stain_matrix`` (3x2)."""
    od = concentrations @ np.asarray(stain_matrix, dtype=np.float64).T
    return _to_uint8(_BACKGROUND_INTENSITY * np.exp(-od))


def synthetic_concentrations(size: int = 256, seed: int = 0) -> np.ndarray:
    """Deterministic tissue-like ``(size, size, 2)`` haematoxylin/eosin concentration maps.

    Stroma (eosin with a little haematoxylin), nuclei (strong haematoxylin) and empty lumen
    (no stain), scaled so the tissue's 99th percentiles equal the reference maxima. Serves
    as the built-in reference tile and as ground truth in tests.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    texture = (np.sin(xx / 9.0) * np.cos(yy / 13.0) + 1.0) / 2.0
    eosin = 0.45 + 0.4 * texture + 0.05 * rng.standard_normal((size, size))
    hema = 0.08 + 0.05 * rng.standard_normal((size, size))
    centres = rng.uniform(0, size, size=(max(size // 6, 4), 2))
    radii = rng.uniform(size / 64, size / 28, size=len(centres))
    distance = np.min(
        np.hypot(yy[None] - centres[:, 0, None, None], xx[None] - centres[:, 1, None, None])
        / radii[:, None, None],
        axis=0,
    )
    nucleus = distance < 1.0
    hema = np.where(nucleus, 1.6 + 0.3 * (1.0 - distance), hema)
    eosin = np.where(nucleus, 0.1 * eosin, eosin)
    concentrations = np.clip(np.stack([hema, eosin], axis=-1), 0.0, None)
    lumen = (np.sin(xx / 31.0 + 1.0) + np.cos(yy / 23.0)) > 1.2
    concentrations[lumen] = 0.0
    tissue = concentrations[~lumen]
    scale = np.asarray(REFERENCE_MAX_CONCENTRATIONS) / np.percentile(tissue, 99, axis=0)
    return concentrations * scale


def reference_tile(size: int = 256) -> np.ndarray:
    """The built-in reference image: :func:`synthetic_concentrations` in the reference stains."""
    return render_stains(synthetic_concentrations(size), np.asarray(REFERENCE_STAIN_MATRIX))


@dataclass(frozen=True)
class MacenkoNormalizer:
    """Macenko et al. (2009): re-render each image's stain concentrations in reference stains.

    Per image, the two stain vectors are the extreme angles (``alpha`` and ``100 - alpha``
    percentiles) of the tissue optical densities projected onto their two principal
    directions; concentrations are then scaled so their 99th percentiles match the reference.
    """

    stain_matrix: tuple[tuple[float, float], ...] = REFERENCE_STAIN_MATRIX
    max_concentrations: tuple[float, float] = REFERENCE_MAX_CONCENTRATIONS
    beta: float = _DEFAULT_BETA
    alpha: float = _DEFAULT_ALPHA

    @classmethod
    def fit(
        cls, reference: np.ndarray, beta: float = _DEFAULT_BETA, alpha: float = _DEFAULT_ALPHA
    ) -> MacenkoNormalizer:
        """A normaliser whose target is the stain appearance of ``reference`` (uint8 RGB)."""
        od = optical_density(_single_image(reference)).reshape(-1, 3)
        estimate = _estimate_stains(od, beta, alpha)
        if estimate is None:
            raise He2stError(f"reference image has fewer than {_MIN_TISSUE_PIXELS} stained pixels")
        matrix, max_concentrations = estimate
        return cls(
            stain_matrix=tuple((float(h), float(e)) for h, e in matrix),
            max_concentrations=(float(max_concentrations[0]), float(max_concentrations[1])),
            beta=beta,
            alpha=alpha,
        )

    @property
    def description(self) -> dict[str, Any]:
        return {
            "kind": "macenko",
            "stain_matrix": [list(row) for row in self.stain_matrix],
            "max_concentrations": list(self.max_concentrations),
            "beta": self.beta,
            "alpha": self.alpha,
        }

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _per_image(images, self._normalize_one)

    def _normalize_one(self, image: np.ndarray) -> np.ndarray:
        od = optical_density(image).reshape(-1, 3)
        estimate = _estimate_stains(od, self.beta, self.alpha)
        if estimate is None:
            return image
        matrix, max_concentrations = estimate
        concentrations = od @ np.linalg.pinv(matrix).T
        concentrations *= np.asarray(self.max_concentrations) / max_concentrations
        return render_stains(concentrations, np.asarray(self.stain_matrix)).reshape(image.shape)


@dataclass(frozen=True)
class ReinhardNormalizer:
    """Reinhard et al. (2001): match each image's tissue CIELAB mean and std to the reference.

    Only tissue pixels (some channel's optical density above ``beta``) are measured and
    changed, so the white background neither skews the statistics nor gets tinted.
    """

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    beta: float = _DEFAULT_BETA

    @classmethod
    def fit(cls, reference: np.ndarray, beta: float = _DEFAULT_BETA) -> ReinhardNormalizer:
        """A normaliser whose target is the tissue colour statistics of ``reference``."""
        image = _single_image(reference)
        mask = _tissue_mask(image, beta)
        if mask.sum() < _MIN_TISSUE_PIXELS:
            raise He2stError(f"reference image has fewer than {_MIN_TISSUE_PIXELS} stained pixels")
        lab = rgb2lab(image)[mask]
        mean, std = lab.mean(axis=0), lab.std(axis=0)
        return cls(
            lab_mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            lab_std=(float(std[0]), float(std[1]), float(std[2])),
            beta=beta,
        )

    @classmethod
    def default(cls) -> ReinhardNormalizer:
        """Fit to the built-in :func:`reference_tile`, i.e. the Macenko reference stains."""
        return cls.fit(reference_tile())

    @property
    def description(self) -> dict[str, Any]:
        return {
            "kind": "reinhard",
            "lab_mean": list(self.lab_mean),
            "lab_std": list(self.lab_std),
            "beta": self.beta,
        }

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _per_image(images, self._normalize_one)

    def _normalize_one(self, image: np.ndarray) -> np.ndarray:
        mask = _tissue_mask(image, self.beta)
        if mask.sum() < _MIN_TISSUE_PIXELS:
            return image
        lab = rgb2lab(image[mask][None])[0]
        mean, std = lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-6)
        lab = (lab - mean) / std * np.asarray(self.lab_std) + np.asarray(self.lab_mean)
        out = image.copy()
        out[mask] = _to_uint8(255.0 * lab2rgb(lab[None])[0])
        return out


@dataclass(frozen=True)
class IdentityNormalizer:
    """No stain normalisation (still validates the input, like the real normalisers)."""

    @property
    def description(self) -> dict[str, Any]:
        return {"kind": "none"}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _per_image(images, lambda image: image)


def make_stain_normalizer(
    kind: StainKind, reference: np.ndarray | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """The normaliser for ``kind`` and its JSON-able description (for embedding metadata).

    ``reference`` (uint8 RGB) replaces the built-in reference: Macenko's published stain
    matrix, or for Reinhard the statistics of the tile rendered in those stains.
    """
    if kind == "none":
        normalizer: IdentityNormalizer | MacenkoNormalizer | ReinhardNormalizer = IdentityNormalizer()
    elif kind == "macenko":
        normalizer = MacenkoNormalizer() if reference is None else MacenkoNormalizer.fit(reference)
    elif kind == "reinhard":
        normalizer = ReinhardNormalizer.default() if reference is None else ReinhardNormalizer.fit(reference)
    else:
        raise He2stError(f"unknown stain normalisation '{kind}': choose none, macenko or reinhard")
    return normalizer, normalizer.description


def _estimate_stains(od: np.ndarray, beta: float, alpha: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Stain matrix (3x2, columns H then E) and 99th-percentile concentrations, or None."""
    tissue = od[(od > beta).all(axis=1)]
    if len(tissue) < _MIN_TISSUE_PIXELS:
        return None
    _, eigenvectors = np.linalg.eigh(np.cov(tissue, rowvar=False))
    plane = eigenvectors[:, [2, 1]]  # the two largest-variance directions
    plane[:, 0] *= np.sign(plane[:, 0].sum())  # OD vectors are positive: orient the main axis with them
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100.0 - alpha])
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    # Haematoxylin absorbs more red light than eosin, so its vector has the larger red OD.
    hema, eosin = (first, second) if first[0] > second[0] else (second, first)
    matrix = np.stack([hema, eosin], axis=1)
    matrix /= np.linalg.norm(matrix, axis=0, keepdims=True)
    concentrations = tissue @ np.linalg.pinv(matrix).T
    return matrix, np.maximum(np.percentile(concentrations, 99, axis=0), 1e-6)


def _tissue_mask(image: np.ndarray, beta: float) -> np.ndarray:
    return optical_density(image).max(axis=-1) > beta


def _per_image(images: np.ndarray, normalize_one: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise He2stError(
            "stain normalisation expects uint8 RGB shaped (H, W, 3) or (N, H, W, 3), "
            f"got {images.dtype} {images.shape}"
        )
    if images.ndim == 3:
        return normalize_one(images)
    return np.stack([normalize_one(image) for image in images]) if len(images) else images.copy()


def _single_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise He2stError(
            f"reference image must be uint8 RGB shaped (H, W, 3), got {image.dtype} {image.shape}"
        )
    return image


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
