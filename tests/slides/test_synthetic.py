"""Synthetic slides: real SVS-like pyramids, deterministic, class signal in sparse structures, stratified manifest."""

from __future__ import annotations

import csv
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile

from distlocal.slides import read_slide, slide_info, write_synthetic_dataset
from distlocal.slides.synthetic import write_synthetic_slide
from distlocal.slides.synthetic_tissue import INK, MOTIFS, STROMA
from distlocal.slides.tissue import MIN_TISSUE_SATURATION, saturation


def _rows(manifest: Path) -> list[dict]:
    with manifest.open() as handle:
        return list(csv.DictReader(handle))


def _level(path: Path, level: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 256 x 256 (at 5X) slides, one per class, written at 20X."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), slides=6, classes=6, size=(256, 256), seed=3)


def test_manifest_columns_and_relative_paths(dataset: Path) -> None:
    """The manifest has slide_id,path,label,split,patient_id and paths relative to its folder."""
    rows = _rows(dataset)
    assert list(rows[0]) == ["slide_id", "path", "label", "split", "patient_id"]
    assert all((dataset.parent / row["path"]).is_file() for row in rows)
    assert sorted(row["label"] for row in rows) == [f"class{c}" for c in range(6)]


def test_slides_are_svs_pyramids_down_to_below_5x(dataset: Path) -> None:
    """A 20X slide is an Aperio-described pyramid 1024 -> 256 (5X) -> 64, JPEG-compressed."""
    info = slide_info(dataset.parent / _rows(dataset)[0]["path"])
    assert (info["format"], info["magnification_source"], info["compression"]) == ("svs", "AppMag", "JPEG")
    assert info["levels"] == [(1024, 1024), (256, 256), (64, 64)]
    assert info["level_magnifications"] == [20.0, 5.0, 1.25]


def test_40x_slides_halve_down_to_below_5x(tmp_path: Path) -> None:
    """A 40X slide has levels 40, 20, 10, 5 and 2.5X."""
    info = slide_info(write_synthetic_slide(tmp_path / "s.tiff", 0, (64, 96), 0, base_magnification=40))
    assert info["levels"] == [(512, 768), (256, 384), (128, 192), (64, 96), (32, 48)]
    assert info["level_magnifications"] == [40.0, 20.0, 10.0, 5.0, 2.5]


def test_slides_read_from_their_5x_level(dataset: Path) -> None:
    """read_slide reads the 5X level and crops glass away."""
    slide = read_slide(dataset.parent / _rows(dataset)[0]["path"])
    assert (slide.source_level, slide.magnification) == (1, 5.0)
    assert slide.image.shape[0] < 256
    assert slide.image.shape[1] < 256


def test_same_seed_same_files(tmp_path: Path) -> None:
    """The same seed writes byte-identical slides and manifest; another seed does not."""
    first, second, other = (write_synthetic_dataset(tmp_path / name, slides=2, classes=2, size=(64, 64), seed=seed)
                            for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert first.read_text() == second.read_text()
    for row in _rows(first):
        assert (first.parent / row["path"]).read_bytes() == (second.parent / row["path"]).read_bytes()
    slide = "slides/slide_0000.tiff"
    assert (first.parent / slide).read_bytes() != (other.parent / slide).read_bytes()


def test_tissue_covers_40_to_70_percent(dataset: Path) -> None:
    """Tissue (saturated pixels) covers 40-70% of every slide at 5X."""
    for row in _rows(dataset):
        fraction = (saturation(_level(dataset.parent / row["path"], 1)) > MIN_TISSUE_SATURATION).mean()
        assert 0.4 <= fraction <= 0.7, row


def test_structures_are_sparse(dataset: Path) -> None:
    """Class structures (dark purple ink) cover 1.5-5% of the tissue at 5X, in every class."""
    for row in _rows(dataset):
        image = _level(dataset.parent / row["path"], 1)
        tissue = saturation(image) > MIN_TISSUE_SATURATION
        ink = np.abs(image.astype(int) - INK.astype(int)).max(axis=-1) < 40
        assert 0.015 <= ink.sum() / tissue.sum() <= 0.05, row


def test_mean_colour_does_not_give_the_class_away(dataset: Path) -> None:
    """Mean tissue colour differs between classes by under 2% of the structures' contrast with the tissue."""
    means = []
    for row in _rows(dataset):
        image = _level(dataset.parent / row["path"], 1)
        means.append(image[saturation(image) > MIN_TISSUE_SATURATION].mean(axis=0))
    spread = np.linalg.norm(np.max(means, axis=0) - np.min(means, axis=0))
    assert spread < 0.02 * np.linalg.norm(STROMA - INK)


def test_manifest_is_stratified(tmp_path: Path) -> None:
    """30 slides of 3 classes split 6/2/2 per class into train/valid/test."""
    rows = _rows(write_synthetic_dataset(tmp_path, slides=30, classes=3, size=(32, 32), seed=1))
    counts = Counter((row["label"], row["split"]) for row in rows)
    assert counts == {(f"class{c}", split): n for c in range(3) for split, n in (("train", 6), ("valid", 2),
                                                                                   ("test", 2))}


def test_too_many_classes_is_refused(tmp_path: Path) -> None:
    """More classes than structure motifs is a clear error."""
    with pytest.raises(ValueError, match=f"classes must be between 1 and {len(MOTIFS)}"):
        write_synthetic_dataset(tmp_path, slides=8, classes=len(MOTIFS) + 1, size=(32, 32), seed=0)


def test_writing_holds_tiles_not_levels(tmp_path: Path) -> None:
    """Writing a slide with a 2048 x 2048 level 0 (12.6 MB) peaks well below that level's size."""
    tracemalloc.start()
    try:
        write_synthetic_slide(tmp_path / "s.tiff", 1, (512, 512), 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2048 * 2048 * 3 / 2


def test_detect_task_leaves_class_zero_without_structures(tmp_path):
    """task=detect: class 0 has no dark structures at all, class 1 has them; subtype puts them in every class."""
    from distlocal.slides.synthetic_tissue import plan_slide

    rng = np.random.default_rng
    assert len(plan_slide((128, 128), 0, rng(0), "detect").primitives) == 0
    assert len(plan_slide((128, 128), 1, rng(0), "detect").primitives) > 0
    assert len(plan_slide((128, 128), 0, rng(0), "subtype").primitives) > 0
    images = {}
    for label in (0, 1):
        path = write_synthetic_slide(tmp_path / f"{label}.tiff", label, (128, 128), 0, task="detect")
        image = read_slide(path, magnification=5.0).image.reshape(-1, 3).astype(float)
        images[label] = (np.abs(image - INK).sum(1) < 60).mean()  # share of ink-coloured pixels
    assert images[0] < 0.001 < images[1]
    with pytest.raises(ValueError, match=r"task must be one of subtype, detect, texture"):
        write_synthetic_dataset(tmp_path / "x", slides=2, classes=2, size=(32, 32), seed=0, task="grade")


def test_texture_task_differs_in_fine_texture_only(tmp_path):
    """
    task=texture: both classes carry the same kind of nodules, in the same mean colour; class 1's vary from pixel
    to pixel (a 2-pixel checker at 5X), class 0's are flat.
    """
    from distlocal.slides.synthetic_tissue import NODULE, plan_slide

    rng = np.random.default_rng
    plans = [plan_slide((128, 128), label, rng(0), "texture") for label in (0, 1)]
    assert plans[0].primitives.shape == plans[1].primitives.shape  # the same draws: the same nodules
    assert plans[0].checker == 0.0 < plans[1].checker
    found = {}
    for label in (0, 1):
        path = write_synthetic_slide(tmp_path / f"{label}.tiff", label, (192, 192), 0, task="texture")
        image = read_slide(path, magnification=5.0, crop_tissue=False).image.astype(float)
        plan = plan_slide((192, 192), label, rng([0, 0]), "texture")
        y, x = int(plan.primitives[0, 1]), int(plan.primitives[0, 2])  # inside the first nodule
        core = image[y - 4:y + 4, x - 4:x + 4]
        found[label] = (core.reshape(-1, 3).mean(0), core.mean(2).std())
    for label in (0, 1):
        assert np.abs(found[label][0] - NODULE).max() < 12  # the nodule's colour, on average
    assert found[0][1] < 8 < 25 < found[1][1]  # flat vs a +-45 grey-level checker
    with pytest.raises(ValueError, match=r"between 1 and 2 for task=texture"):
        write_synthetic_dataset(tmp_path / "y", slides=2, classes=3, size=(32, 32), seed=0, task="texture")


def _checker_energy(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean |2 x 2 checker filter| of the grey image over the tissue: a 1-pixel checker's energy, ~0 when smooth."""
    grey = image.astype(float).mean(2)
    response = np.abs(grey[:-1, :-1] - grey[1:, :-1] - grey[:-1, 1:] + grey[1:, 1:]) / 4
    return float(response[mask[:-1, :-1]].mean())


def test_fine_task_is_visible_at_10x_and_averaged_away_at_5x(tmp_path):
    """
    task=fine: the texture task's checker at one 10X pixel (2 x 2 pixels at 20X). Two written 20X slides that differ
    only in their class (the same seed: the same tissue and nodules) read identically at 5X, pixel for pixel, and at
    10X class 1 has several times class 0's checker energy.
    """
    reads = {}
    for label in (0, 1):
        path = write_synthetic_slide(tmp_path / f"{label}.tiff", label, (48, 48), 3, task="fine")
        reads[label] = [read_slide(path, magnification=m) for m in (5.0, 10.0)]
    np.testing.assert_array_equal(reads[0][0].image, reads[1][0].image)
    smooth, fine = (_checker_energy(reads[label][1].image, reads[label][1].mask) for label in (0, 1))
    assert fine > 3 * smooth, (smooth, fine)
