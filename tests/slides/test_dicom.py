"""
DICOM-WSI folders from a real scan: the real Aperio SVS converted by wsidicom's own writer, read back by the DICOM
reader (wsidicom) and by OpenSlide, against tifffile's read of the source; incomplete and damaged series refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from distlocal.slides import SlideError, read_slide, slide_info
from distlocal.slides.dicom_writer import write_dicom_slide
from distlocal.slides.open import choose_reader, open_slide
from distlocal.slides.pyramid import open_pyramid
from tests.slides.slide_files import real_svs

BAND = (1000, 0, 1500, 2220)  # level 0 rows across three tile rows of the DICOM (256) and the SVS (240), all columns


def _source_band() -> np.ndarray:
    with open_pyramid(real_svs()) as pyramid:
        return pyramid.levels[0].read(*BAND)


@pytest.fixture(scope="module")
def lossless_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SVS (2967 x 2220 at 20X) as lossless JPEG 2000 DICOM-WSI, with the dyadic levels added (5 levels)."""
    folder = tmp_path_factory.mktemp("dicom") / "lossless"
    with open_pyramid(real_svs()) as pyramid:
        write_dicom_slide(pyramid.levels, folder, mpp=0.499, lossless=True)
    return folder


@pytest.fixture(scope="module")
def concatenated_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SVS as JPEG DICOM-WSI with every level of more than 20 frames split into 20-frame instances."""
    folder = tmp_path_factory.mktemp("dicom") / "concatenated"
    with open_pyramid(real_svs()) as pyramid:
        write_dicom_slide(pyramid.levels, folder, mpp=0.499, frames_per_instance=20)
    return folder


def _instances(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(f, pydicom.dcmread(f, stop_before_pixels=True)) for f in sorted(folder.iterdir())]


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_lossless_dicom_level0_equals_the_source_in_both_readers(lossless_dicom: Path) -> None:
    """Lossless JPEG 2000: wsidicom's and OpenSlide's level 0 equal tifffile's decode of the SVS, pixel for pixel."""
    source = _source_band()
    for reader in ("dicom", "openslide"):
        with open_slide(lossless_dicom, reader) as pyramid:
            assert (pyramid.reader, pyramid.format) == (reader, "dicom")
            np.testing.assert_array_equal(pyramid.levels[0].read(*BAND), source)


def test_dicom_magnification_and_levels_from_its_metadata(lossless_dicom: Path) -> None:
    """PixelSpacing 0.499 um gives 20X; the 5X read comes from the 5X level, the same through both readers."""
    info = slide_info(lossless_dicom)
    assert (info["reader"], info["base_magnification"], info["mpp"]) == ("dicom", 20.0, 0.499)
    assert info["magnification_source"] == "DICOM PixelSpacing"
    assert info["levels"][:3] == [(2967, 2220), (1484, 1110), (742, 555)]
    assert "Lossless" in info["compression"]
    ours, reference = read_slide(lossless_dicom), read_slide(lossless_dicom, reader="openslide")
    assert (ours.reader, ours.magnification, ours.source_level) == ("dicom", 5.0, 2)
    np.testing.assert_array_equal(ours.image, reference.image)


def test_a_slide_named_by_one_instance_opens_its_series(lossless_dicom: Path) -> None:
    """A manifest may name any one .dcm of the series: the instances beside it of the same series are opened."""
    one = next(f for f, header in _instances(lossless_dicom) if header.TotalPixelMatrixColumns == 139)
    assert choose_reader(one) == choose_reader(lossless_dicom) == "dicom"
    np.testing.assert_array_equal(read_slide(one).image, read_slide(lossless_dicom).image)


def test_concatenated_levels_read_as_one_level(concatenated_dicom: Path) -> None:
    """Level 0 split over 6 instances reads whole; wsidicom and OpenSlide decode the same JPEG frames alike."""
    headers = _instances(concatenated_dicom)
    assert max(int(h.get("InConcatenationTotalNumber", 1)) for _, h in headers) == 6
    with open_slide(concatenated_dicom) as ours, open_slide(concatenated_dicom, "openslide") as reference:
        np.testing.assert_array_equal(ours.levels[0].read(0, 0, 2967, 600), reference.levels[0].read(0, 0, 2967, 600))


def test_5x_read_never_decodes_level_0(lossless_dicom: Path, tmp_path: Path) -> None:
    """Level 0's pixel data zeroed out (frames undecodable): the 5X read, from the 5X level, is unchanged."""
    folder = _copy(lossless_dicom, tmp_path)
    level0 = next(f for f, header in _instances(folder) if header.TotalPixelMatrixColumns == 2220)
    data = bytearray(level0.read_bytes())
    data[len(data) // 4 :] = bytes(len(data) - len(data) // 4)
    level0.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_slide(folder).image, read_slide(lossless_dicom).image)
    with pytest.raises(SlideError, match="corrupt, truncated or missing frames in level 0"):
        read_slide(folder, magnification=20.0)


def test_missing_concatenation_part_is_refused(concatenated_dicom: Path, tmp_path: Path) -> None:
    """A level with one of its 6 instances gone is refused, naming the folder, the level and what is missing."""
    folder = _copy(concatenated_dicom, tmp_path)
    part = next(f for f, h in _instances(folder) if h.get("InConcatenationNumber") == 2
                and h.TotalPixelMatrixColumns == 2220)
    part.unlink()
    with pytest.raises(SlideError, match=r"concatenated: level 2967 x 2220 is missing frames: 88 of 108 tiles "
                                         r"present \(5 of 6 concatenation parts present\)"):
        read_slide(folder)
    with pytest.raises(SlideError, match="Missing SOP instance"):
        read_slide(folder, reader="openslide")


@pytest.mark.parametrize(("kept", "problem"), [(4000, "corrupt, truncated or missing frames in level 2"),
                                              (300, "instance {name} is unreadable .*truncated")])
def test_truncated_instance_is_refused(lossless_dicom: Path, tmp_path: Path, kept: int, problem: str) -> None:
    """The 5X level's file cut short: in its frames the read fails, in its header the instance is named."""
    folder = _copy(lossless_dicom, tmp_path)
    level = next(f for f, header in _instances(folder) if header.TotalPixelMatrixColumns == 555)
    level.write_bytes(level.read_bytes()[:kept])
    with pytest.raises(SlideError, match=f"lossless: {problem.format(name=level.name)}"):
        read_slide(folder)


def test_another_slides_instance_in_the_folder_is_named(lossless_dicom: Path, concatenated_dicom: Path,
                                                        tmp_path: Path) -> None:
    """An instance of another series dropped into a slide's folder is named, not read or silently left out."""
    folder = _copy(lossless_dicom, tmp_path)
    stray = next(f for f, header in _instances(concatenated_dicom) if header.TotalPixelMatrixColumns == 555)
    shutil.copy(stray, folder / "stray.dcm")
    with pytest.raises(SlideError, match=r"instance stray\.dcm \(a 742 x 555 VOLUME level\) is not part of any level"):
        read_slide(folder)


def test_missing_level_0_reads_from_what_is_there(lossless_dicom: Path, tmp_path: Path) -> None:
    """Without the 20X instance the 10X level is the largest; its own PixelSpacing keeps the 5X read the same."""
    folder = _copy(lossless_dicom, tmp_path)
    next(f for f, header in _instances(folder) if header.TotalPixelMatrixColumns == 2220).unlink()
    assert slide_info(folder)["base_magnification"] == 10.0
    np.testing.assert_array_equal(read_slide(folder).image, read_slide(lossless_dicom).image)


def test_folders_without_a_slide_are_refused(tmp_path: Path) -> None:
    """An empty folder, or one without slide instances, is named with what a DICOM slide folder holds."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="empty: empty folder"):
        read_slide(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideError, match="other: no DICOM whole-slide image in 1 file"):
        read_slide(other)


def test_forcing_tifffile_on_a_folder_names_the_reader_to_use(lossless_dicom: Path) -> None:
    """data.reader=tifffile on a DICOM folder says to use data.reader=dicom."""
    with pytest.raises(SlideError, match=r"data\.reader=dicom"):
        read_slide(lossless_dicom, reader="tifffile")
