"""read_slide: level choice, output size at the target magnification, tissue crop, formats and compressions."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from distlocal.slides import read_slide, slide_info
from tests.slides.slide_files import (
    TISSUE_BOX_20X,
    aperio,
    downsample,
    pyramid,
    tissue_image,
    write_svs,
    write_tiff,
)


def test_svs_reads_the_5x_level(svs_20x: Path) -> None:
    """A 20X SVS with a 5X level is read from that level, at 5X."""
    slide = read_slide(svs_20x)
    assert (slide.source_level, slide.magnification) == (1, 5.0)


def test_output_is_the_whole_slide_at_5x_without_crop(svs_20x: Path) -> None:
    """Without the tissue crop the output is the whole slide at 5X (level 0 / 4)."""
    slide = read_slide(svs_20x, crop_tissue=False)
    assert slide.image.shape == (256, 256, 3)
    assert slide.bbox == (0, 0, 256, 256)


def test_40x_slide_is_resized_from_the_10x_level(tmp_path: Path) -> None:
    """A 40X slide with 40X/10X/2.5X levels is read from 10X and halved to 5X."""
    levels = pyramid(tissue_image((1024, 1024), TISSUE_BOX_20X), 4, 3)
    path = write_svs(tmp_path / "s.svs", levels, aperio((1024, 1024), app_mag=40, mpp=0.25))
    slide = read_slide(path, crop_tissue=False)
    assert (slide.source_level, slide.image.shape) == (1, (128, 128, 3))


def test_resize_is_an_area_average(tmp_path: Path) -> None:
    """The 10X -> 5X resize of a lossless slide equals the 2x2 box average of the 10X level."""
    levels = pyramid(tissue_image((512, 512), (128, 128, 384, 384)), 2, 3)
    path = write_tiff(tmp_path / "s.tif", levels, compression="zlib", resolution=(10000, "CENTIMETER"))
    slide = read_slide(path, crop_tissue=False)
    assert np.abs(slide.image.astype(int) - downsample(levels[0], 2).astype(int)).max() <= 1


def test_other_target_magnification(svs_20x: Path) -> None:
    """A 10X target reads level 0 (20X) and halves it; a 1.25X target reads the smallest level."""
    assert read_slide(svs_20x, magnification=10, crop_tissue=False).image.shape == (512, 512, 3)
    assert read_slide(svs_20x, magnification=1.25, crop_tissue=False).source_level == 2


def test_level_override_reads_that_level(svs_20x: Path) -> None:
    """``level=0`` forces reading level 0, still resized to 5X."""
    slide = read_slide(svs_20x, level=0, crop_tissue=False)
    assert (slide.source_level, slide.image.shape) == (0, (256, 256, 3))


def test_level_below_target_is_not_upsampled(svs_20x: Path) -> None:
    """A forced level below the target is returned at its own magnification."""
    slide = read_slide(svs_20x, level=2, crop_tissue=False)
    assert (slide.image.shape, slide.magnification) == ((64, 64, 3), 1.25)


def test_base_magnification_overrides_metadata(svs_20x: Path) -> None:
    """``base_magnification=10`` makes level 0 a 10X level, halved to 5X."""
    slide = read_slide(svs_20x, base_magnification=10, crop_tissue=False)
    assert (slide.source_level, slide.image.shape) == (0, (512, 512, 3))


@pytest.mark.parametrize("layout", ["subifds", "pages"])
def test_generic_pyramid_levels_are_found(tmp_path: Path, layout: str) -> None:
    """Levels stored as SubIFDs or as separate pages are both used."""
    levels = pyramid(tissue_image((1024, 1024), TISSUE_BOX_20X), 4, 3)
    path = write_tiff(tmp_path / "s.tif", levels, layout=layout, resolution=(20000, "CENTIMETER"))
    slide = read_slide(path, crop_tissue=False)
    assert (slide.source_level, slide.image.shape) == (1, (256, 256, 3))


def test_ome_tiff_pyramid(tmp_path: Path) -> None:
    """An OME-TIFF with PhysicalSizeX 0.5 um is a 20X slide read from its 5X SubIFD."""
    levels = pyramid(tissue_image((1024, 1024), TISSUE_BOX_20X), 4, 3)
    path = write_tiff(tmp_path / "s.ome.tif", levels, ome_mpp=0.5)
    slide = read_slide(path, crop_tissue=False)
    assert (slide.source_level, slide.image.shape) == (1, (256, 256, 3))


COMPRESSIONS = ["jpeg", "lzw", "zlib", None] + (["jpeg2000"] if imagecodecs.JPEG2K.available else [])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compressions_decode(tmp_path: Path, compression: str | None) -> None:
    """Every supported compression reads back the 5X level (exactly when lossless)."""
    levels = pyramid(tissue_image((512, 640), (128, 128, 384, 512)), 4, 2)
    path = write_tiff(tmp_path / "s.tif", levels, compression=compression, resolution=(20000, "CENTIMETER"))
    image = read_slide(path, crop_tissue=False).image
    tolerance = 0 if compression in ("lzw", "zlib", None) else 12
    assert np.abs(image.astype(int) - levels[1].astype(int)).mean() <= tolerance


def test_stripped_tiff_is_read(tmp_path: Path) -> None:
    """A non-tiled (stripped) TIFF is read strip by strip."""
    image = tissue_image((300, 200), (50, 50, 250, 150))
    path = write_tiff(tmp_path / "s.tif", [image], compression=None, tile=None, rowsperstrip=16)
    assert np.array_equal(read_slide(path, crop_tissue=False).image, image)


def test_tissue_crop_contains_tissue_and_drops_glass(svs_20x: Path) -> None:
    """The crop contains the drawn tissue (rows 64-192, cols 96-224 at 5X) and little else."""
    y0, x0, y1, x1 = read_slide(svs_20x, tissue_margin=0.02).bbox
    assert 64 - 12 <= y0 <= 64
    assert 96 - 12 <= x0 <= 96
    assert 192 <= y1 <= 192 + 12
    assert 224 <= x1 <= 224 + 12


def test_cropped_image_is_the_bbox_of_the_whole(svs_20x: Path) -> None:
    """The cropped image equals the uncropped image inside ``bbox``."""
    whole = read_slide(svs_20x, crop_tissue=False).image
    slide = read_slide(svs_20x)
    y0, x0, y1, x1 = slide.bbox
    assert np.array_equal(slide.image, whole[y0:y1, x0:x1])


def test_mask_is_aligned_with_image(svs_20x: Path) -> None:
    """The mask has the image's shape, is True on the tissue and False on the glass."""
    slide = read_slide(svs_20x, crop_tissue=False)
    assert slide.mask.shape == slide.image.shape[:2]
    assert slide.mask[80:176, 112:208].all()
    assert not slide.mask[:56].any()
    assert not slide.mask[:, :88].any()


def test_png_is_read_at_the_target_magnification(tmp_path: Path) -> None:
    """A PNG without metadata is taken to be at the target magnification: same size, level 0."""
    image = tissue_image((300, 400), (50, 50, 250, 350))
    path = tmp_path / "s.png"
    imagecodecs.imwrite(path, image)
    slide = read_slide(path, crop_tissue=False)
    assert np.array_equal(slide.image, image)
    assert (slide.magnification, slide.source_level) == (5.0, 0)


def test_jpeg_is_read_at_the_target_magnification(tmp_path: Path) -> None:
    """A JPEG without metadata is taken to be at the target magnification."""
    path = tmp_path / "s.jpg"
    imagecodecs.imwrite(path, tissue_image((300, 400), (50, 50, 250, 350)), level=95)
    assert read_slide(path, crop_tissue=False).image.shape == (300, 400, 3)


def test_png_with_base_magnification_is_resized(tmp_path: Path) -> None:
    """A PNG declared as 10X is halved to 5X."""
    path = tmp_path / "s.png"
    imagecodecs.imwrite(path, tissue_image((300, 400), (50, 50, 250, 350)))
    assert read_slide(path, base_magnification=10, crop_tissue=False).image.shape == (150, 200, 3)


def test_opaque_rgba_png_drops_alpha(tmp_path: Path) -> None:
    """An RGBA PNG whose alpha is all opaque is read as RGB."""
    image = tissue_image((100, 100), (20, 20, 80, 80))
    path = tmp_path / "s.png"
    imagecodecs.imwrite(path, np.dstack([image, np.full((100, 100), 255, np.uint8)]))
    assert np.array_equal(read_slide(path, crop_tissue=False).image, image)


def test_single_level_tiff_without_metadata_is_at_target(tmp_path: Path) -> None:
    """A small single-level TIFF without magnification is a pre-exported image at the target."""
    image = tissue_image((256, 256), (64, 64, 192, 192))
    path = write_tiff(tmp_path / "s.tif", [image], compression="lzw")
    slide = read_slide(path, magnification=5, crop_tissue=False)
    assert (slide.image.shape, slide.magnification) == ((256, 256, 3), 5.0)


def test_slide_info_reports_the_pyramid(svs_20x: Path) -> None:
    """slide_info gives format, level shapes, magnifications and their source."""
    info = slide_info(svs_20x)
    assert info["format"] == "svs"
    assert info["levels"] == [(1024, 1024), (256, 256), (64, 64)]
    assert info["level_magnifications"] == [20.0, 5.0, 1.25]
    assert info["magnification_source"] == "AppMag"
    assert (info["mpp"], info["compression"]) == (0.5, "JPEG")


def _large_slide(path: Path) -> Path:
    """8192 x 8192 at 20X with 5X and 1.25X levels, written tile by tile; tissue in the middle half."""

    def tiles(side: int):
        for y in range(0, side, 256):
            for x in range(0, side, 256):
                edges = (side // 4, side // 4, 3 * side // 4, 3 * side // 4)
                box = [max(0, min(256, e - o)) for e, o in zip(edges, (y, x, y, x), strict=True)]
                yield tissue_image((256, 256), tuple(box))

    with tifffile.TiffWriter(path) as tiff:
        for level, side in enumerate((8192, 2048, 512)):
            tiff.write(tiles(side), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                       compression="jpeg", subifds=2 if level == 0 else 0, subfiletype=int(level > 0),
                       resolution=(20000 / 4**level, 20000 / 4**level), resolutionunit="CENTIMETER", metadata=None)
    return path


def test_reading_never_decodes_full_resolution(tmp_path: Path) -> None:
    """Reading an 8192^2 20X slide peaks near its 5X size, far below one 20X level (201 MB)."""
    path = _large_slide(tmp_path / "large.tif")
    tracemalloc.start()
    try:
        slide = read_slide(path, crop_tissue=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output_bytes = 2048 * 2048 * 3
    assert slide.source_level == 1
    assert slide.image.shape == (2048, 2048, 3)
    assert peak < 2 * output_bytes
