"""
The OpenSlide backend: the scanner formats tifffile does not read region by region (MRXS, NDPI, SCN, Philips TIFF,
Ventana BIF, VMS, ...), through OpenSlide 4 (the C library ships in the openslide-bin wheel).

Each level reads a rectangle with ``read_region`` in chunks, so even a whole level read at the target size (the
5X level itself) never holds more than a chunk of RGBA beside the output. OpenSlide returns transparent pixels
where the scanner imaged nothing (MRXS and SCN regions between tissue areas, NDPI's padding): that is glass, and
is composited onto white.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide

from distlocal.slides.errors import SlideError
from distlocal.slides.magnification import BaseMagnification, magnification_from_mpp, plausible_mpp
from distlocal.slides.pyramid import Pyramid, read_in_chunks

__all__ = ["OpenSlideLevel", "open_openslide", "openslide_vendor"]

# Rows, columns of one read_region call (16 MB of RGBA). Large, because read_region takes its corner in level 0
# pixels: where OpenSlide's downsample of a level is not a whole number (2967 / 742 = 3.9987 averaged with
# 2220 / 555 = 4 is 3.99933), a corner inside the level maps to a fractional level position and OpenSlide
# interpolates the read by up to 1 / (2 x downsample) of a pixel: the fewer chunk corners, the fewer such seams.
# (Reading the chunks on threads was tried: no faster on the loaded 2-core VM, 100 MB more peak memory.)
_CHUNK = (1024, 4096)
# OpenSlide's vendor names as the formats users know them.
_FORMATS = {"mirax": "mrxs", "leica": "scn", "philips": "philips-tiff", "ventana": "bif", "aperio": "svs",
            "generic-tiff": "tiff", "dicom": "dicom", "zeiss": "czi", "sakura": "svslide", "trestle": "tif",
            "synthetic": "synthetic"}
_REEXPORT = "re-download or re-copy the slide (an MRXS slide needs its .mrxs file and its data folder beside it)"


def openslide_vendor(path: str | os.PathLike) -> str | None:
    """OpenSlide's vendor for a file it can open ("hamamatsu", "mirax", ...), None when it cannot; reads headers."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideLevel:
    """One OpenSlide level; ``read`` takes the level's own pixels, as every Level does."""

    def __init__(self, slide: openslide.OpenSlide, path: Path, number: int) -> None:
        self._slide, self._path, self.number = slide, path, number
        width, height = slide.level_dimensions[number]
        self.shape = (int(height), int(width))
        self._downsample = float(slide.level_downsamples[number])

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return read_in_chunks(y0, x0, y1, x1, self._read_chunk, _CHUNK)

    def _read_chunk(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        # read_region takes level 0 coordinates for the corner and the level's own pixels for the size.
        corner = (round(x0 * self._downsample), round(y0 * self._downsample))
        try:
            region = np.asarray(self._slide.read_region(corner, self.number, (x1 - x0, y1 - y0)))
        except openslide.OpenSlideError as exc:
            raise SlideError(self._path, f"corrupt or truncated data in level {self.number} (OpenSlide: {exc})",
                             _REEXPORT) from exc
        return _on_white(region)


def _check_mrxs_folder(path: Path) -> None:
    # An MRXS slide is the .mrxs file plus a folder of the same name holding Slidedat.ini, Index.dat and the data
    # files: copying the .mrxs alone is the usual mistake, and OpenSlide then only says it does not know the file.
    if path.suffix.lower() != ".mrxs":
        return
    folder = path.with_suffix("")
    if not (folder / "Slidedat.ini").is_file():
        missing = f"folder {folder.name}/" if not folder.is_dir() else f"{folder.name}/Slidedat.ini"
        raise SlideError(path, f"MRXS slide without its {missing} beside it", "copy the .mrxs file together with "
                               "its folder of the same name (Slidedat.ini, Index.dat, Data*.dat)")


def _on_white(rgba: np.ndarray) -> np.ndarray:
    # OpenSlide's RGBA is not premultiplied; alpha 0 is "not scanned", which is glass.
    alpha = rgba[..., 3:4]
    if (alpha == 255).all():
        return rgba[..., :3]
    blended = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16)) + 127) // 255
    return blended.astype(np.uint8)


def open_openslide(path: str | os.PathLike) -> Pyramid:
    """Open a slide with OpenSlide; raise SlideError naming the slide when OpenSlide cannot."""
    path = Path(path)
    target = path
    if path.is_dir():  # a DICOM folder: OpenSlide opens the series of any one of its instances
        target = min((f for f in path.iterdir() if f.is_file() and f.suffix.lower() == ".dcm"), default=path)
    if not target.is_file():
        raise SlideError(path, "file not found" if not path.exists() else "folder without .dcm files",
                         "check the path (manifest paths are relative to the manifest's folder)")
    try:
        slide = openslide.OpenSlide(str(target))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        _check_mrxs_folder(path)
        raise SlideError(path, "OpenSlide does not recognise this file", "check that it is a whole-slide image, "
                               "or set data.reader=auto to let distlocal choose the reader") from exc
    except openslide.OpenSlideError as exc:
        raise SlideError(path, f"corrupt or incomplete slide (OpenSlide: {exc})", _REEXPORT) from exc
    try:
        props = slide.properties
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        kind = _FORMATS.get(vendor, vendor)
        if vendor == "hamamatsu":
            kind = "ndpi" if path.suffix.lower() == ".ndpi" else "vms"
        levels = [OpenSlideLevel(slide, path, n) for n in range(slide.level_count)]
        pyramid = Pyramid(path, kind, levels, _base_magnification(props), props.get("tiff.Compression", "unknown"),
                          [slide.close], reader="openslide")
    except Exception:
        slide.close()
        raise
    return pyramid


def _base_magnification(props: Mapping[str, str]) -> BaseMagnification:
    mpp = _number(props.get(openslide.PROPERTY_NAME_MPP_X))
    mpp = mpp if mpp is not None and plausible_mpp(mpp) else None
    power = _number(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power is not None and power > 0:
        return BaseMagnification(power, mpp, "openslide.objective-power")
    if mpp is not None:
        return BaseMagnification(magnification_from_mpp(mpp), mpp, "openslide.mpp-x")
    return BaseMagnification(None, None, "none")


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
