"""
Tissue detection on a slide thumbnail: HSV saturation, Otsu threshold, a little morphology, bounding box.

Glass and background are grey or white (low saturation) whatever the scanner's white balance, while H&E-stained
tissue is pink or purple (high saturation), so one global Otsu threshold on saturation separates them without
tuning. A floor on the threshold keeps an empty slide from having its JPEG noise split into "tissue".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_TISSUE_SATURATION", "TissueMask", "detect_tissue", "otsu_threshold", "saturation", "tissue_bbox"]

MIN_TISSUE_SATURATION = 20  # of 255; pale eosin is ~40, white glass with JPEG noise under ~10
_MIN_TISSUE_FRACTION = 1e-3  # fewer tissue pixels than this (after cleanup) is an empty slide or dust


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and the saturation threshold that made it (0-255)."""

    mask: np.ndarray  # bool, H x W
    threshold: float

    @property
    def found(self) -> bool:
        """Whether enough tissue was found to be a slide rather than dust on glass."""
        return bool(self.mask.mean() >= _MIN_TISSUE_FRACTION) if self.mask.size else False


def saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation of an HxWx3 uint8 RGB image as uint8 0-255, in integer arithmetic to stay image-sized."""
    high = image.max(axis=-1)
    low = image.min(axis=-1)
    spread = (high - low).astype(np.uint16) * 255
    return (spread // np.maximum(high, 1)).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> float:
    """
    Otsu's threshold of uint8 values: the cut maximising the between-class variance of the histogram.

    Pixels ``> threshold`` form the upper class.

    Example:
        >>> otsu_threshold(np.array([10] * 50 + [200] * 50, dtype=np.uint8))
        10.0

    """
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(histogram)
    weight_high = total - weight_low
    sum_low = np.cumsum(histogram * levels)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(np.argmax(between))


def detect_tissue(thumbnail: np.ndarray) -> TissueMask:
    """Tissue mask of an RGB thumbnail: saturation above max(Otsu, floor), then opening and closing (3x3)."""
    sat = saturation(thumbnail)
    threshold = max(otsu_threshold(sat), float(MIN_TISSUE_SATURATION))
    mask = sat > threshold
    # Opening drops isolated specks (dust, JPEG ringing); closing fills pin-holes (lumens, nuclei halos).
    mask = _dilate(_erode(mask))
    mask = _erode(_dilate(mask))
    return TissueMask(mask, threshold)


def tissue_bbox(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """
    Bounding box ``(y0, x0, y1, x1)`` of the True pixels, grown by ``margin`` times each side and clipped.

    Example:
        >>> m = np.zeros((100, 100), bool); m[40:60, 30:50] = True
        >>> tissue_bbox(m, 0.05)
        (35, 25, 65, 55)

    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    height, width = mask.shape
    pad_y = round(margin * height)
    pad_x = round(margin * width)
    return (
        max(0, int(rows[0]) - pad_y),
        max(0, int(cols[0]) - pad_x),
        min(height, int(rows[-1]) + 1 + pad_y),
        min(width, int(cols[-1]) + 1 + pad_x),
    )


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=True)
    return _reduce(padded, np.logical_and, mask.shape)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return _reduce(padded, np.logical_or, mask.shape)


def _reduce(padded: np.ndarray, op: np.ufunc, shape: tuple[int, ...]) -> np.ndarray:
    height, width = shape
    out = padded[1 : 1 + height, 1 : 1 + width].copy()
    for dy in range(3):
        for dx in range(3):
            op(out, padded[dy : dy + height, dx : dx + width], out=out)
    return out
