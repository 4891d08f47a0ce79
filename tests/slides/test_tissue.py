"""Tissue detection: saturation, Otsu, mask cleanup, bounding box."""

from __future__ import annotations

import numpy as np

from distlocal.slides.tissue import MIN_TISSUE_SATURATION, detect_tissue, otsu_threshold, saturation, tissue_bbox
from tests.slides.slide_files import tissue_image


def test_saturation_of_grey_is_zero_and_of_pink_is_high() -> None:
    """White and grey have no saturation; H&E pink has a lot."""
    pixels = np.array([[[255, 255, 255], [128, 128, 128], [230, 150, 200]]], dtype=np.uint8)
    assert saturation(pixels).tolist() == [[0, 0, 88]]


def test_otsu_splits_two_populations() -> None:
    """Otsu's threshold falls between the two modes of a bimodal histogram."""
    values = np.concatenate([np.full(500, 8), np.full(300, 90)]).astype(np.uint8)
    assert 8 <= otsu_threshold(values) < 90


def test_detect_tissue_finds_the_pink_region() -> None:
    """The mask is the pink rectangle, with the threshold at least the floor."""
    tissue = detect_tissue(tissue_image((128, 128), (32, 40, 96, 100)))
    expected = np.zeros((128, 128), bool)
    expected[32:96, 40:100] = True
    assert np.array_equal(tissue.mask, expected)
    assert tissue.threshold >= MIN_TISSUE_SATURATION


def test_cleanup_drops_specks() -> None:
    """Isolated saturated pixels (dust) are not tissue."""
    image = tissue_image((64, 64), (0, 0, 0, 0))
    image[10, 10] = image[40, 50] = (230, 150, 200)
    assert not detect_tissue(image).found


def test_bbox_adds_the_margin_and_clips() -> None:
    """The bounding box grows by the margin fraction of each side, clipped to the image."""
    mask = np.zeros((100, 200), bool)
    mask[2:50, 100:150] = True
    assert tissue_bbox(mask, 0.05) == (0, 90, 55, 160)
