"""
NDPI, SCN and Philips TIFF, written as their TIFF layouts (tests/slides/scanner_files.py), and MRXS, written as
OpenSlide's MIRAX reader reads it (tests/slides/mrxs_file.py), read through OpenSlide:
the reader chosen per file, magnification from each format's metadata, the 5X read from the 5X level equal to an
independent decode of that level's JPEG data, damaged files named, and `prepare` recording the reader per slide.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from distlocal.cli import main
from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.slides import SlideError, read_slide, slide_info
from distlocal.slides.cache import cache_key
from distlocal.slides.dicom_writer import write_dicom_slide
from distlocal.slides.open import choose_reader
from distlocal.slides.pyramid import ArrayLevel
from tests.slides.mrxs_file import JPEG_QUALITY, write_mrxs
from tests.slides.scanner_files import write_ndpi, write_philips, write_scn
from tests.slides.slide_files import TISSUE_BOX_20X, aperio, pyramid, tissue_image, write_svs

WRITERS = {"ndpi": write_ndpi, "scn": write_scn, "philips-tiff": write_philips}
SUFFIX = {"ndpi": ".ndpi", "scn": ".scn", "philips-tiff": ".tiff"}
SCN_MARGIN = 8  # write_scn's 16 um margin around the scan, in 5X pixels (2 um each)
MRXS_TISSUE_20X = (128, 192, 384, 320)  # camera photos outside it hold only glass: the scanner takes none
MRXS_IMAGE = 64  # write_mrxs's image side, at every level
# Photos split into 1 image (positions on the nominal grid) / 2 x 2 images placed by stitching positions.
MRXS_LAYOUTS = {"grid": {"divisions": 1, "stitched": False}, "stitched": {"divisions": 2, "stitched": True}}


@pytest.fixture(scope="module")
def levels() -> list[np.ndarray]:
    """20X (1024), 5X (256) and 1.25X (64) levels of a slide with tissue in TISSUE_BOX_20X."""
    return pyramid(tissue_image((1024, 1024), TISSUE_BOX_20X), 4, 3)


@pytest.fixture(scope="module")
def slides(levels: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One slide per format (and an SVS), of the same levels at 20X, 0.5 um per pixel."""
    folder = tmp_path_factory.mktemp("scanner")
    paths = {kind: write(folder / f"slide{SUFFIX[kind]}", levels) for kind, write in WRITERS.items()}
    paths["svs"] = write_svs(folder / "slide.svs", levels, aperio((1024, 1024)))
    return paths


@pytest.fixture(scope="module")
def mrxs_levels() -> list[np.ndarray]:
    """MRXS halves each level: 20X (512), 10X (256) and 5X (128), tissue in MRXS_TISSUE_20X."""
    return pyramid(tissue_image((512, 512), MRXS_TISSUE_20X), 2, 3)


@pytest.fixture(scope="module", params=list(MRXS_LAYOUTS))
def mrxs(request: pytest.FixtureRequest, mrxs_levels: list[np.ndarray],
         tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MRXS slide (.mrxs, Slidedat.ini, Index.dat, Data0000.dat) at 20X, 0.5 um per pixel, in each layout."""
    return write_mrxs(tmp_path_factory.mktemp("mrxs") / f"{request.param}.mrxs", mrxs_levels,
                      **MRXS_LAYOUTS[request.param])


def _mrxs_level_shown(mrxs: Path, levels: list[np.ndarray], n: int) -> np.ndarray:
    """
    Level ``n`` as OpenSlide shows it: the decoded JPEGs where it places them, white (transparent) elsewhere.

    Each image is its own JPEG, encoded as write_mrxs encodes it; OpenSlide and imagecodecs both decode with
    libjpeg-turbo's defaults (islow IDCT, fancy upsampling), so the same bitstream gives the same pixels. With
    stitching positions OpenSlide shows exactly the photos taken; without, whole stored images (its tiles are
    images, each shown if it holds any photo taken): the tissue's box snapped out to that grid (level 0 pixels).
    """
    layout = MRXS_LAYOUTS[mrxs.stem]
    photo = MRXS_IMAGE * layout["divisions"]
    grid = photo if layout["stitched"] else MRXS_IMAGE * max(layout["divisions"], 2**n)
    y0, x0, y1, x1 = (v // grid * grid if i < 2 else -(-v // grid) * grid for i, v in enumerate(MRXS_TISSUE_20X))
    level, decoded = levels[n], np.empty_like(levels[n])
    for y in range(0, level.shape[0], MRXS_IMAGE):
        for x in range(0, level.shape[1], MRXS_IMAGE):
            jpeg = imagecodecs.jpeg8_encode(level[y : y + MRXS_IMAGE, x : x + MRXS_IMAGE], level=JPEG_QUALITY)
            decoded[y : y + MRXS_IMAGE, x : x + MRXS_IMAGE] = imagecodecs.jpeg8_decode(jpeg)
    out = np.full_like(level, 255)
    shown = np.s_[y0 // 2**n : y1 // 2**n, x0 // 2**n : x1 // 2**n]
    out[shown] = decoded[shown]
    return out


def test_auto_reads_mrxs_with_openslide_and_its_slidedat_magnification(mrxs: Path) -> None:
    """An .mrxs goes to OpenSlide; OBJECTIVE_MAGNIFICATION gives 20X, level 0's MICROMETER_PER_PIXEL_X 0.5 um."""
    assert choose_reader(mrxs) == "openslide"
    info = slide_info(mrxs)
    assert (info["reader"], info["format"], info["levels"]) == ("openslide", "mrxs", [(512, 512), (256, 256),
                                                                                      (128, 128)])
    assert (info["base_magnification"], info["mpp"], info["magnification_source"]) == (
        20.0, 0.5, "openslide.objective-power")
    assert info["level_magnifications"] == [20.0, 10.0, 5.0]


def test_mrxs_without_objective_takes_magnification_from_its_mpp(mrxs_levels: list[np.ndarray],
                                                                tmp_path: Path) -> None:
    """Slidedat.ini without OBJECTIVE_MAGNIFICATION: level 0's MICROMETER_PER_PIXEL_X (0.5 um) gives 20X."""
    info = slide_info(write_mrxs(tmp_path / "slide.mrxs", mrxs_levels, objective=None))
    assert (info["base_magnification"], info["mpp"], info["magnification_source"]) == (20.0, 0.5, "openslide.mpp-x")


def test_mrxs_5x_read_equals_the_decoded_jpegs_of_its_5x_level(mrxs: Path, mrxs_levels: list[np.ndarray]) -> None:
    """The 5X crop comes from the stored 5X zoom level and equals its JPEGs decoded where OpenSlide places them."""
    slide = read_slide(mrxs)
    assert (slide.reader, slide.magnification, slide.source_level) == ("openslide", 5.0, 2)
    y0, x0, y1, x1 = slide.bbox
    assert max(y0 - 32, x0 - 48, 96 - y1, 80 - x1) <= 0  # MRXS_TISSUE_20X at 5X (32, 48, 96, 80) is inside
    np.testing.assert_array_equal(slide.image, _mrxs_level_shown(mrxs, mrxs_levels, 2)[y0:y1, x0:x1])


def test_mrxs_20x_read_shows_the_photos_taken_on_white_glass(mrxs: Path, mrxs_levels: list[np.ndarray]) -> None:
    """At 20X only the photos taken have pixels; OpenSlide leaves the rest transparent, which is white glass."""
    image = read_slide(mrxs, magnification=20.0, crop_tissue=False).image
    np.testing.assert_array_equal(image, _mrxs_level_shown(mrxs, mrxs_levels, 0))


@pytest.mark.parametrize(("layout", "name", "keep"), [("stitched", "Index.dat", 2 / 3), ("stitched", "Index.dat", 0.1),
                                                     ("stitched", "Data0000.dat", 0.99),  # the positions cut
                                                     ("grid", "Data0000.dat", 0.9)])  # 5X images cut
def test_truncated_mrxs_files_are_named(mrxs_levels: list[np.ndarray], tmp_path: Path, layout: str, name: str,
                                        keep: float) -> None:
    """An MRXS whose Index.dat or data file is cut short is a SlideError naming the .mrxs, whichever reader."""
    path = write_mrxs(tmp_path / "cut.mrxs", mrxs_levels, **MRXS_LAYOUTS[layout])
    damaged = tmp_path / "cut" / name
    data = damaged.read_bytes()
    damaged.write_bytes(data[: int(len(data) * keep)])
    for reader in ("auto", "openslide"):
        with pytest.raises(SlideError, match=r"cut\.mrxs: corrupt or incomplete slide \(OpenSlide: .+\)\. "
                                             r"re-download or re-copy"):
            read_slide(path, reader=reader)


def test_mrxs_cache_key_covers_its_data_folder(mrxs_levels: list[np.ndarray], tmp_path: Path) -> None:
    """Re-copying an MRXS slide's data files (its .mrxs untouched) makes `prepare` read it again."""
    path = write_mrxs(tmp_path / "slide.mrxs", mrxs_levels)
    before = cache_key(path, 5.0, None, None)
    data = tmp_path / "slide" / "Data0000.dat"
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_key(path, 5.0, None, None) != before


def test_auto_reads_scanner_formats_with_openslide(slides: dict[str, Path]) -> None:
    """NDPI, SCN and Philips TIFF go to OpenSlide, an Aperio SVS stays with tifffile; each is recorded."""
    for kind, path in slides.items():
        expected = "tifffile" if kind == "svs" else "openslide"
        assert choose_reader(path) == expected
        info = slide_info(path)
        assert (info["reader"], info["format"]) == (expected, kind)


@pytest.mark.parametrize(("kind", "source"), [("ndpi", "openslide.objective-power"),
                                              ("scn", "openslide.objective-power"),
                                              ("philips-tiff", "openslide.mpp-x")])
def test_magnification_comes_from_each_formats_metadata(slides: dict[str, Path], kind: str, source: str) -> None:
    """NDPI's source lens tag and SCN's objective give 20X; Philips' pixel spacing (0.5 um) gives it too."""
    info = slide_info(slides[kind])
    assert (info["base_magnification"], info["mpp"], info["magnification_source"]) == (20.0, 0.5, source)


@pytest.mark.parametrize("kind", ["scn", "philips-tiff"])
def test_tiled_formats_5x_read_equals_tifffiles_decode_of_the_5x_level(slides: dict[str, Path], kind: str) -> None:
    """The 5X crop comes from the stored 5X level and equals tifffile's decode of that page, pixel for pixel."""
    slide = read_slide(slides[kind])
    assert (slide.reader, slide.magnification, slide.source_level) == ("openslide", 5.0, 1)
    with tifffile.TiffFile(slides[kind]) as tiff:
        level = tiff.pages[1].asarray()
    shift = SCN_MARGIN if kind == "scn" else 0  # SCN's level 0 is the whole slide, the scan placed inside it
    y0, x0, y1, x1 = (v - shift for v in slide.bbox)
    np.testing.assert_array_equal(slide.image, level[y0:y1, x0:x1])


def test_ndpi_5x_read_equals_the_decoded_jpeg_of_its_5x_level(slides: dict[str, Path],
                                                               levels: list[np.ndarray]) -> None:
    """NDPI stores each level as one JPEG: the 5X crop is that JPEG's decode (same encoder, same settings)."""
    slide = read_slide(slides["ndpi"])
    assert (slide.magnification, slide.source_level) == (5.0, 2)  # OpenSlide adds a 10X level by JPEG scaling
    level = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(levels[1], level=95))
    y0, x0, y1, x1 = slide.bbox
    np.testing.assert_array_equal(slide.image, level[y0:y1, x0:x1])


def test_scn_area_outside_the_scan_is_white_glass(slides: dict[str, Path]) -> None:
    """OpenSlide's transparent pixels (nothing scanned there) become white, not black."""
    image = read_slide(slides["scn"], crop_tissue=False).image
    assert image.shape == (272, 272, 3)
    assert (image[:SCN_MARGIN] == 255).all()
    assert (image[:, -SCN_MARGIN:] == 255).all()


def test_forcing_openslide_on_an_svs_gives_tifffiles_pixels(slides: dict[str, Path]) -> None:
    """data.reader=openslide on an SVS decodes the same JPEG tiles to the same crop."""
    ours, forced = read_slide(slides["svs"]), read_slide(slides["svs"], reader="openslide")
    assert forced.reader == "openslide"
    np.testing.assert_array_equal(forced.image, ours.image)


def test_no_magnification_names_the_settings(levels: list[np.ndarray], tmp_path: Path) -> None:
    """Through OpenSlide, a pyramid without objective or mpp is refused naming data.base_magnification."""
    path = tmp_path / "bare.tif"
    with tifffile.TiffWriter(path) as tiff:  # reduced-resolution pages, as OpenSlide's generic TIFF wants them
        for number, level in enumerate(levels):
            tiff.write(level, tile=(64, 64), photometric="rgb", subfiletype=1 if number else 0, metadata=None)
    with pytest.raises(SlideError, match=r"bare\.tif: pyramidal slide .*no openslide\.objective-power or "
                                         r"openslide\.mpp-x.*data\.base_magnification"):
        read_slide(path, reader="openslide")
    assert read_slide(path, reader="openslide", base_magnification=20.0).source_level == 1


@pytest.mark.parametrize("kind", ["ndpi", "scn", "philips-tiff"])
def test_truncated_files_are_named(slides: dict[str, Path], kind: str, tmp_path: Path) -> None:
    """A scanner file cut short is a SlideError naming it, whichever reader is used."""
    data = slides[kind].read_bytes()
    path = tmp_path / f"cut{SUFFIX[kind]}"
    path.write_bytes(data[: len(data) * 2 // 3])
    for reader in ("auto", "openslide"):
        with pytest.raises(SlideError, match=rf"cut\{SUFFIX[kind]}: .*(corrupt|truncated|not recognise)"):
            read_slide(path, reader=reader)


def test_mrxs_without_its_data_folder_names_it(tmp_path: Path) -> None:
    """An .mrxs copied without its folder of data files is refused naming the folder it needs."""
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"\x00" * 64)
    assert choose_reader(path) == "openslide"
    with pytest.raises(SlideError, match=r"slide\.mrxs: MRXS slide without its folder slide/ beside it"):
        read_slide(path)
    (tmp_path / "slide").mkdir()
    with pytest.raises(SlideError, match=r"without its slide/Slidedat\.ini"):
        read_slide(path)


def test_data_reader_takes_only_known_readers() -> None:
    """data.reader is checked when the config is loaded."""
    assert load_config(None, ["data.reader=dicom"]).data.reader == "dicom"
    with pytest.raises(ConfigError, match=r"data\.reader"):
        load_config(None, ["data.reader=bioformats"])


def test_prepare_records_readers_and_skips_bad_slides_of_every_format(slides: dict[str, Path],
                                                                      levels: list[np.ndarray],
                                                                      mrxs_levels: list[np.ndarray],
                                                                      tmp_path: Path) -> None:
    """NDPI, MRXS, DICOM and damaged SCN / MRXS / DICOM slides: readers recorded, bad slides listed and skipped."""
    dicom = tmp_path / "dicom"
    write_dicom_slide([ArrayLevel(level) for level in levels], dicom, mpp=0.5, tile=128, add_missing_levels=False)
    broken = Path(shutil.copytree(dicom, tmp_path / "broken"))
    cut = max(broken.iterdir(), key=lambda f: f.stat().st_size)  # level 0: its header cut short
    cut.write_bytes(cut.read_bytes()[:300])
    truncated = tmp_path / "cut.scn"
    truncated.write_bytes(slides["scn"].read_bytes()[:20000])
    mrxs = write_mrxs(tmp_path / "scan.mrxs", mrxs_levels, **MRXS_LAYOUTS["stitched"])
    cut_mrxs = write_mrxs(tmp_path / "cut.mrxs", mrxs_levels, **MRXS_LAYOUTS["stitched"])
    index = tmp_path / "cut" / "Index.dat"
    index.write_bytes(index.read_bytes()[:200])
    manifest = tmp_path / "manifest.csv"
    rows = [("ndpi", slides["ndpi"], "a"), ("dicom", dicom, "b"), ("mrxs", mrxs, "b"), ("bad_scn", truncated, "a"),
            ("bad_dicom", broken, "b"), ("bad_mrxs", cut_mrxs, "a")]
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([("slide_id", "path", "label", "split"),
                                      *[(i, p, label, "train") for i, p, label in rows]])
    out = tmp_path / "cache"
    assert main(["prepare", str(manifest), "--out", str(out), "--workers", "1", "--set", "data.on_error=skip"]) == 0
    report = json.loads((out / "prepare.json").read_text())
    assert report["reader_of"] == {"ndpi": "openslide", "dicom": "dicom", "mrxs": "openslide"}
    assert report["readers"] == {"openslide": 2, "dicom": 1}
    assert json.loads((out / "dicom.json").read_text())["reader"] == "dicom"
    assert json.loads((out / "mrxs.json").read_text())["reader"] == "openslide"
    skipped = {row["slide_id"]: row["reason"] for row in csv.DictReader((out / "skipped.csv").open())}
    assert set(skipped) == {"bad_scn", "bad_dicom", "bad_mrxs"}
    assert "cut.scn" in skipped["bad_scn"]
    assert "cut.mrxs: corrupt or incomplete slide" in skipped["bad_mrxs"]
    assert f"instance {cut.name} is unreadable" in skipped["bad_dicom"]
    assert main(["prepare", str(manifest), "--out", str(out), "--workers", "1", "--set", "data.on_error=skip"]) == 0
    assert json.loads((out / "prepare.json").read_text())["reused"] == 3  # a DICOM folder's cache entry is reused
