"""
OpenSlide, the field's reference reader, against distlocal's reader: the same pixels and the same magnification.

Where distlocal reads a pyramid level as it is, its pixels must equal OpenSlide's read of that level and region
exactly (both decode the JPEG tiles with libjpeg-turbo). Where it resamples a level to 5X, the reference is
OpenSlide's pixels area-averaged in float64 by an independent dense-matrix formula: distlocal computes the same
averages in float32 with float32 weights, an error under 1e-3 of a grey level for the spans of slide pyramids, so
after rounding to uint8 the two differ by at most 1 (only where the exact mean lies that close to a half).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from distlocal.slides import read_slide, slide_info, write_synthetic_slide
from distlocal.slides.magnification import magnification_from_mpp
from distlocal.slides.pyramid import open_pyramid
from tests.slides.slide_files import TISSUE_BOX_20X, aperio, pyramid, real_svs, tissue_image, write_svs, write_tiff

RESAMPLE_TOLERANCE = 1  # grey levels; derived in the module docstring


def _openslide_region(path: Path, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """OpenSlide's RGB pixels of ``box`` = (y0, x0, y1, x1) in ``level``'s own pixels."""
    with openslide.OpenSlide(str(path)) as slide:
        scale = slide.level_downsamples[level]
        y0, x0, y1, x1 = box
        region = slide.read_region((round(x0 * scale), round(y0 * scale)), level, (x1 - x0, y1 - y0))
        return np.asarray(region.convert("RGB"))


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Output pixel j is the mean of input [j f, (j + 1) f), f = n_in / n_out, as an n_out x n_in float64 matrix."""
    f = n_in / n_out
    lo = np.arange(n_out)[:, None] * f
    i = np.arange(n_in)[None, :]
    return np.clip(np.minimum(lo + f, i + 1) - np.maximum(lo, i), 0, None) / f


def _area_resampled(level: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.einsum("yi,ijc,xj->yxc", _area_matrix(level.shape[0], shape[0]), level.astype(np.float64),
                    _area_matrix(level.shape[1], shape[1]), optimize=True)
    return np.rint(out).astype(np.uint8)


def test_real_scan_level_decodes_exactly_as_openslide():
    """Every pixel of the real Aperio scan's level 0, decoded tile by tile, equals OpenSlide's read_region."""
    path = real_svs()
    with open_pyramid(path) as slide:
        ours = slide.levels[0].read(0, 0, *slide.levels[0].shape)
    np.testing.assert_array_equal(ours, _openslide_region(path, 0, (0, 0, *ours.shape[:2])))


def test_real_scan_5x_read_is_openslides_level_area_resampled():
    """The 20X-only scan is resampled to 5X (2967 -> 742 rows: not a whole factor) within one grey level."""
    path = real_svs()
    slide = read_slide(path)
    assert (slide.source_level, slide.magnification) == (0, 5.0)
    level = _openslide_region(path, 0, (0, 0, 2967, 2220))
    y0, x0, y1, x1 = slide.bbox
    reference = _area_resampled(level, (742, 555))[y0:y1, x0:x1]
    difference = np.abs(slide.image.astype(int) - reference)
    assert difference.max() <= RESAMPLE_TOLERANCE
    assert (difference > 0).mean() < 1e-3  # a tie at a half is rare: a systematic shift would show here


@pytest.mark.parametrize("base", [20.0, 40.0])
def test_synthetic_pyramid_5x_read_equals_openslides_5x_level(tmp_path, base):
    """A synthetic SVS has a 5X level: the tissue crop equals OpenSlide's read of that level and region."""
    path = write_synthetic_slide(tmp_path / "slide.svs", 1, (300, 260), 0, base)
    slide = read_slide(path)
    with openslide.OpenSlide(str(path)) as reference:
        assert reference.properties["openslide.vendor"] == "aperio"
        level = reference.get_best_level_for_downsample(base / 5.0)
    assert slide.source_level == level
    np.testing.assert_array_equal(slide.image, _openslide_region(path, level, slide.bbox))


def test_resampled_10x_level_equals_openslides_within_one(tmp_path):
    """A 40X scan with 4x levels (40X, 10X, 2.5X) has no 5X level: the 10X level is halved within one level."""
    levels = pyramid(tissue_image((1024, 1024), TISSUE_BOX_20X), 4, 3)
    path = write_svs(tmp_path / "slide.svs", levels, aperio((1024, 1024), app_mag=40, mpp=0.25))
    slide = read_slide(path, crop_tissue=False)
    assert (slide.source_level, slide.image.shape) == (1, (128, 128, 3))
    reference = _area_resampled(_openslide_region(path, 1, (0, 0, 256, 256)), (128, 128))
    assert np.abs(slide.image.astype(int) - reference).max() <= RESAMPLE_TOLERANCE


def test_magnification_equals_openslides_objective_power_and_mpp(tmp_path):
    """Base magnification and MPP agree with OpenSlide's properties on the real scan and on written slides."""
    image = tissue_image((256, 256), (64, 64, 192, 192))
    paths = [real_svs(), write_synthetic_slide(tmp_path / "synthetic.svs", 0, (128, 128), 0, 40.0),
             write_tiff(tmp_path / "resolution.tif", [image], layout="pages", resolution=(40000.0, "CENTIMETER"))]
    for path in paths:
        info = slide_info(path)
        with openslide.OpenSlide(str(path)) as reference:
            props = dict(reference.properties)
            assert info["levels"] == [(h, w) for w, h in reference.level_dimensions]
        assert info["mpp"] == pytest.approx(float(props[openslide.PROPERTY_NAME_MPP_X]))
        power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)  # only Aperio files state the objective
        expected = float(power) if power else magnification_from_mpp(float(props[openslide.PROPERTY_NAME_MPP_X]))
        assert info["base_magnification"] == expected, path.name
