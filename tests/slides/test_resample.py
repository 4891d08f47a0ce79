"""Area resampling: exact for integer factors, mean-preserving otherwise, the same band by band."""

from __future__ import annotations

import numpy as np

from distlocal.slides.resample import area_resize, area_weights, resample_band

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (96, 120, 3), dtype=np.uint8)


def test_integer_factor_is_the_block_mean() -> None:
    """Halving equals the mean of each 2x2 block."""
    expected = IMAGE.reshape(48, 2, 60, 2, 3).mean((1, 3))
    assert np.abs(area_resize(IMAGE, (48, 60)).astype(float) - expected).max() <= 0.5


def test_fractional_factor_preserves_the_mean() -> None:
    """A 96x120 -> 37x53 resize keeps the image mean."""
    assert abs(area_resize(IMAGE, (37, 53)).mean() - IMAGE.mean()) < 0.5


def test_weights_sum_to_one() -> None:
    """Every output pixel's weights sum to 1."""
    weights = area_weights(1000, 333)
    assert np.allclose(weights.weight.sum(axis=1), 1.0)


def test_band_by_band_equals_whole() -> None:
    """Resampling rows 10..20 from their own band equals the same rows of the whole resize."""
    whole = area_resize(IMAGE, (37, 53), band_rows=1000)
    rows, cols = area_weights(96, 37, 10, 20), area_weights(120, 53)
    band = resample_band(IMAGE[rows.start : rows.stop], rows, cols)
    assert np.array_equal(band, whole[10:20])
