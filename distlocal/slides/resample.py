"""
Area (box) resampling in plain numpy, applied band by band so a slide never needs a full-size float copy.

Area averaging is what a microscope's lower objective does to the light: every output pixel is the mean of the
input area it covers, with fractional weights at its borders. It neither aliases (as striding does) nor blurs
beyond the output pixel (as a Gaussian pyramid does), and it is exact for the integer factors of slide pyramids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AxisWeights", "area_weights", "area_resize", "resample_band"]


@dataclass(frozen=True)
class AxisWeights:
    """
    How output pixels ``first..first+len(index)-1`` along one axis are built from input pixels.

    Output pixel ``j`` is ``sum_k weight[j, k] * input[start + index[j, k]]``; ``index`` is relative to ``start``
    so that a band read from ``start`` to ``stop`` can be resampled on its own.
    """

    start: int
    stop: int
    index: np.ndarray  # int, (n_out, span)
    weight: np.ndarray  # float32, (n_out, span), rows sum to 1


def area_weights(in_len: int, out_len: int, first: int = 0, last: int | None = None) -> AxisWeights:
    """
    Area weights for output pixels ``first..last-1`` when ``in_len`` pixels become ``out_len``.

    Output pixel ``j`` covers input ``[j * f, (j + 1) * f)`` with ``f = in_len / out_len``.

    Example:
        >>> w = area_weights(6, 4)
        >>> w.index.tolist(), (w.weight * 3).round().tolist()
        ([[0, 1], [1, 2], [3, 4], [4, 5]], [[2.0, 1.0], [1.0, 2.0], [2.0, 1.0], [1.0, 2.0]])

    """
    last = out_len if last is None else last
    if not (0 <= first < last <= out_len) or in_len < 1:
        raise ValueError(f"cannot take output pixels {first}..{last} of {out_len} from {in_len} input pixels")
    factor = in_len / out_len
    j = np.arange(first, last, dtype=np.float64)
    lo = j * factor
    hi = np.minimum((j + 1) * factor, in_len)
    first_in = np.floor(lo).astype(np.int64)
    last_in = np.minimum(np.ceil(hi).astype(np.int64), in_len)  # exclusive
    span = int((last_in - first_in).max())
    index = first_in[:, None] + np.arange(span)[None, :]
    overlap = np.minimum(hi[:, None], index + 1) - np.maximum(lo[:, None], index)
    overlap = np.clip(overlap, 0.0, None)
    weight = (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)
    start = int(first_in[0])
    stop = int(last_in.max())
    index = np.minimum(index, stop - 1)  # zero-weight padding must still index inside the band
    return AxisWeights(start, stop, index - start, weight)


def resample_band(band: np.ndarray, rows: AxisWeights, cols: AxisWeights) -> np.ndarray:
    """
    Resample an HxWxC uint8 band read from ``[rows.start:rows.stop, cols.start:cols.stop]`` to uint8.

    Columns go first: the float32 intermediate is then only as wide as the output.
    """
    out = _apply(band, cols, axis=1)
    out = _apply(out, rows, axis=0)
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


def area_resize(image: np.ndarray, shape: tuple[int, int], band_rows: int = 256) -> np.ndarray:
    """
    Area-resize an HxWxC uint8 image to ``shape`` (rows, cols), band by band.

    Example:
        >>> area_resize(np.arange(16, dtype=np.uint8).reshape(4, 4, 1), (2, 2))[..., 0].tolist()
        [[2, 4], [10, 12]]

    """
    out_h, out_w = shape
    in_h, in_w = image.shape[:2]
    if (out_h, out_w) == (in_h, in_w):
        return image.copy()
    cols = area_weights(in_w, out_w)
    out = np.empty((out_h, out_w, *image.shape[2:]), dtype=np.uint8)
    step = max(1, math.floor(band_rows * out_h / in_h))
    for y in range(0, out_h, step):
        rows = area_weights(in_h, out_h, y, min(y + step, out_h))
        out[y : y + step] = resample_band(image[rows.start : rows.stop], rows, cols)
    return out


def _apply(array: np.ndarray, weights: AxisWeights, axis: int) -> np.ndarray:
    index, weight = weights.index, weights.weight
    shape = [1] * array.ndim
    shape[axis] = index.shape[0]
    out = np.zeros(
        tuple(index.shape[0] if a == axis else n for a, n in enumerate(array.shape)), dtype=np.float32
    )
    for k in range(index.shape[1]):
        column = weight[:, k]
        if not column.any():
            continue
        out += np.take(array, index[:, k], axis=axis) * column.reshape(shape)
    return out
