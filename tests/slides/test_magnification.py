"""Base magnification from each metadata source: AppMag, MPP, resolution tags, OME PhysicalSizeX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from distlocal.slides.magnification import find_base_magnification, magnification_from_mpp
from tests.slides.slide_files import aperio, write_tiff

IMAGE = np.full((64, 64, 3), 200, dtype=np.uint8)


def _base(path: Path):
    with tifffile.TiffFile(path) as tif:
        return find_base_magnification(tif)


def test_aperio_appmag(tmp_path: Path) -> None:
    """An Aperio description's AppMag is the base magnification, its MPP is kept."""
    base = _base(write_tiff(tmp_path / "s.svs", [IMAGE], description=aperio((64, 64), app_mag=40, mpp=0.2527),
                            metadata=None))
    assert (base.magnification, base.mpp, base.source) == (40.0, 0.2527, "AppMag")


def test_aperio_mpp_without_appmag(tmp_path: Path) -> None:
    """Without AppMag, Aperio's MPP 0.5 gives 20X."""
    base = _base(write_tiff(tmp_path / "s.svs", [IMAGE], description=aperio((64, 64), app_mag=None, mpp=0.5),
                            metadata=None))
    assert (base.magnification, base.source) == (20.0, "MPP")


def test_resolution_tags_in_centimetres(tmp_path: Path) -> None:
    """XResolution 40000 px/cm is 0.25 um/px, 40X."""
    base = _base(write_tiff(tmp_path / "s.tif", [IMAGE], resolution=(40000, "CENTIMETER")))
    assert (base.magnification, base.mpp, base.source) == (40.0, 0.25, "resolution tags")


def test_resolution_tags_in_inches(tmp_path: Path) -> None:
    """XResolution 50800 px/inch is 0.5 um/px, 20X."""
    base = _base(write_tiff(tmp_path / "s.tif", [IMAGE], resolution=(50800, "INCH")))
    assert (base.magnification, base.mpp) == (20.0, 0.5)


def test_screen_resolution_is_ignored(tmp_path: Path) -> None:
    """A 72 dpi resolution (an image editor's default) is not a microscope's: no magnification."""
    base = _base(write_tiff(tmp_path / "s.tif", [IMAGE], resolution=(72, "INCH")))
    assert (base.magnification, base.source) == (None, "none")


def test_ome_physical_size(tmp_path: Path) -> None:
    """OME PhysicalSizeX 1.0 um is 10X."""
    base = _base(write_tiff(tmp_path / "s.ome.tif", [IMAGE], ome_mpp=1.0))
    assert (base.magnification, base.source) == (10.0, "OME PhysicalSizeX")


def test_no_metadata(tmp_path: Path) -> None:
    """A TIFF with none of the sources has no magnification."""
    base = _base(write_tiff(tmp_path / "s.tif", [IMAGE], metadata=None))
    assert (base.magnification, base.mpp, base.source) == (None, None, "none")


def test_measured_mpp_snaps_to_the_objective() -> None:
    """A measured 0.2527 um/px is 40X and 0.504 um/px is 20X; an odd 0.8 um/px stays 12.5X."""
    assert (magnification_from_mpp(0.2527), magnification_from_mpp(0.504), magnification_from_mpp(0.8)) == (
        40.0, 20.0, 12.5)
