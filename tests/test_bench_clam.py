"""bench inference's CLAM-style baseline from the file: OpenSlide tiles at 5X where the tissue is, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distlocal.bench.clam import _TileBag, clam_pipeline, open_slide, plan_tiles
from distlocal.bench.patch_mil import PatchMIL
from distlocal.slides import SlideError, read_slide, write_synthetic_slide
from tests.slides.slide_files import aperio, pyramid, tissue_image, write_svs, write_tiff

_RAW = ([0.0, 0.0, 0.0], [1 / 255] * 3)  # Normalize with these gives the tile's 0-255 values back


def _tile(bag: _TileBag, index: int) -> np.ndarray:
    return bag[index].permute(1, 2, 0).round().to(torch.uint8).numpy()


def test_tiles_are_openslides_5x_level_where_the_tissue_is(tmp_path):
    """On a 20X scan, tiles come from the 5X level as they are, equal to distlocal's 5X read at those places."""
    path = write_synthetic_slide(tmp_path / "slide.svs", 1, (480, 400), 0, 20.0)
    with open_slide(path) as slide:
        plan = plan_tiles(slide, path)
    assert (plan.level, plan.read_size) == (1, 224)
    assert 1 <= len(plan.coords) <= plan.grid_tiles
    image = read_slide(path, crop_tissue=False)
    bag = _TileBag(path, plan, *_RAW)
    for index in range(len(plan.coords)):
        x, y = plan.coords[index] // 4
        part = image.image[y : y + 224, x : x + 224]
        np.testing.assert_array_equal(_tile(bag, index)[: part.shape[0], : part.shape[1]], part)
        assert image.mask[y : y + 224, x : x + 224].any()  # kept tiles touch the tissue


def test_tiles_of_a_10x_level_are_read_twice_as_large_and_resized(tmp_path):
    """A 40X scan with 4x levels has no 5X level: 448 px are read at 10X and resized to 224 px, as CLAM does."""
    levels = pyramid(tissue_image((2048, 2048), (256, 256, 1792, 1792)), 4, 3)
    path = write_svs(tmp_path / "slide.svs", levels, aperio((2048, 2048), app_mag=40, mpp=0.25))
    with open_slide(path) as slide:
        plan = plan_tiles(slide, path)
    assert (plan.level, plan.read_size, plan.grid_tiles) == (1, 448, 1)
    tile = _tile(_TileBag(path, plan, *_RAW), 0)
    assert tile.shape == (224, 224, 3)
    assert abs(tile[100:120, 100:120].astype(float).mean(-1).mean() - np.mean((230, 150, 200))) < 10  # pink


def test_pipeline_classifies_the_slide_with_every_tile(tmp_path):
    """The DataLoader with a worker gives GABMIL one feature per kept tile; the steps add up to the total."""
    path = write_synthetic_slide(tmp_path / "slide.svs", 1, (480, 400), 0, 20.0)
    model = PatchMIL.build("resnet18", 2, torch.device("cpu"), False, batch=2, mean=[0.5] * 3, std=[0.25] * 3)
    result = clam_pipeline(model, path, workers=1, mean=[0.5] * 3, std=[0.25] * 3)
    with open_slide(path) as slide:
        assert result["tiles"] == len(plan_tiles(slide, path).coords)
    assert result["probs"].shape == (2,)
    assert result["total_s"] == pytest.approx(result["tiling_s"] + result["features_s"] + result["prediction_s"])
    assert 0 <= result["wait_s"] <= result["features_s"]


def test_slide_without_magnification_or_not_a_slide_names_the_file_and_the_fix(tmp_path):
    path = write_tiff(tmp_path / "plain.tif", [tissue_image((256, 256), (64, 64, 192, 192))], layout="pages")
    with open_slide(path) as slide, pytest.raises(SlideError, match=r"plain\.tif: OpenSlide finds neither.*--mode"):
        plan_tiles(slide, path)
    (tmp_path / "notes.svs").write_text("not a slide")
    with pytest.raises(SlideError, match=r"notes\.svs: OpenSlide cannot read it"):
        open_slide(tmp_path / "notes.svs")
