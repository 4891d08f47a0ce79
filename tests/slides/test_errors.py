"""Bad input: each case raises SlideError naming the slide, the problem and the fix."""

from __future__ import annotations

import pickle
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from distlocal.slides import SlideError, read_slide, reader
from tests.slides.slide_files import TISSUE_BOX_20X, pyramid, tissue_image, write_tiff

TISSUE = tissue_image((256, 256), (64, 64, 192, 192))


def test_missing_file(tmp_path: Path) -> None:
    """A missing file names the path and says it was not found."""
    with pytest.raises(SlideError, match=r"nope\.svs: file not found\. check the path"):
        read_slide(tmp_path / "nope.svs")


def test_unrecognised_format(tmp_path: Path) -> None:
    """A file that is no image format says so."""
    path = tmp_path / "notes.svs"
    path.write_text("not a slide")
    with pytest.raises(SlideError, match="unrecognised file format"):
        read_slide(path)


def test_corrupt_tiff(tmp_path: Path) -> None:
    """A TIFF header followed by garbage is a corrupt TIFF."""
    path = tmp_path / "s.tif"
    path.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(SlideError, match="corrupt or truncated TIFF"):
        read_slide(path)


def test_truncated_tiff(tmp_path: Path) -> None:
    """A download cut short (tile data missing at the end) says the file is truncated."""
    path = write_tiff(tmp_path / "s.tif", [TISSUE], compression="lzw", resolution=(20000, "CENTIMETER"))
    data = path.read_bytes()
    path.write_bytes(data[: 2 * len(data) // 3])
    with pytest.raises(SlideError, match="truncated file: level 0's tiles end at byte"):
        read_slide(path)


def test_unsupported_compression(tmp_path: Path) -> None:
    """A compression imagecodecs cannot decode is named."""
    path = write_tiff(tmp_path / "s.tif", [TISSUE], compression=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages.first.tags["Compression"].overwrite(32809)  # THUNDERSCAN
    with pytest.raises(SlideError, match=r"unsupported compression THUNDERSCAN \(TIFF code 32809\).*re-save"):
        read_slide(path)


def test_corrupt_tile(tmp_path: Path) -> None:
    """A tile whose bytes do not decode names the tile and level."""
    path = write_tiff(tmp_path / "s.tif", [TISSUE], compression="jpeg", resolution=(10000, "CENTIMETER"))
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.dataoffsets[5]
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match="corrupt or truncated tile 5 of level 0"):
        read_slide(path)


def test_grayscale_tiff(tmp_path: Path) -> None:
    """A grayscale TIFF is refused with the fix: convert to RGB."""
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, TISSUE[..., 0], tile=(64, 64), compression="lzw")
    with pytest.raises(SlideError, match=r"grayscale image \(1 channel\).*convert it to 8-bit RGB"):
        read_slide(path)


def test_grayscale_png(tmp_path: Path) -> None:
    """A grayscale PNG is refused the same way."""
    path = tmp_path / "s.png"
    imagecodecs.imwrite(path, np.ascontiguousarray(TISSUE[..., 0]))
    with pytest.raises(SlideError, match="grayscale image"):
        read_slide(path)


def test_sixteen_bit_tiff(tmp_path: Path) -> None:
    """16-bit samples are refused with the fix: 8-bit RGB."""
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, TISSUE.astype(np.uint16) * 257, photometric="rgb")
    with pytest.raises(SlideError, match="16-bit samples"):
        read_slide(path)


def test_transparent_rgba_png(tmp_path: Path) -> None:
    """An RGBA image with transparent pixels says so and asks to flatten it."""
    alpha = np.full((256, 256), 255, np.uint8)
    alpha[:10] = 0
    path = tmp_path / "s.png"
    imagecodecs.imwrite(path, np.dstack([TISSUE, alpha]))
    with pytest.raises(SlideError, match=r"RGBA image with transparent pixels.*flatten"):
        read_slide(path)


def test_transparent_rgba_tiff(tmp_path: Path) -> None:
    """An RGBA TIFF with transparent pixels is refused when its tiles are decoded."""
    alpha = np.zeros((256, 256), np.uint8)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, np.dstack([TISSUE, alpha]), photometric="rgb", extrasamples="unassalpha",
                     tile=(64, 64))
    with pytest.raises(SlideError, match="RGBA image with transparent pixels"):
        read_slide(path)


def test_no_tissue(tmp_path: Path) -> None:
    """A blank slide says 'no tissue found' and the threshold used."""
    path = write_tiff(tmp_path / "s.tif", [tissue_image((256, 256), (0, 0, 0, 0))], compression="jpeg")
    with pytest.raises(SlideError, match=r"no tissue found.*saturation above \d+/255"):
        read_slide(path)


def test_pyramid_without_magnification(tmp_path: Path) -> None:
    """A pyramid without magnification metadata asks for data.base_magnification or data.level."""
    path = write_tiff(tmp_path / "s.tif", pyramid(tissue_image((1024, 1024), TISSUE_BOX_20X), 4, 2), metadata=None)
    with pytest.raises(SlideError, match=r"without magnification.*data\.base_magnification.*data\.level"):
        read_slide(path)


def test_large_image_without_magnification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single-level image too large to be a 5X export, without magnification, asks for the setting."""
    monkeypatch.setattr(reader, "_LARGEST_UNLABELLED_SIDE", 200)
    path = write_tiff(tmp_path / "s.tif", [TISSUE], metadata=None)
    with pytest.raises(SlideError, match=r"too large to be a pre-exported image.*data\.base_magnification"):
        read_slide(path)


def test_level_out_of_range(tmp_path: Path) -> None:
    """A data.level the slide does not have lists the levels it has."""
    path = write_tiff(tmp_path / "s.tif", [TISSUE])
    with pytest.raises(SlideError, match=r"level 3 does not exist: the slide has 1 level\(s\)"):
        read_slide(path, level=3)


def test_error_survives_pickling() -> None:
    """A SlideError crosses process boundaries intact (preparation runs in worker processes)."""
    error = pickle.loads(pickle.dumps(SlideError("a.svs", "no tissue found", "remove it")))
    assert (str(error), error.path, error.problem, error.fix) == ("a.svs: no tissue found. remove it", "a.svs",
                                                                   "no tissue found", "remove it")
