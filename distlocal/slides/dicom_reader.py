"""
The DICOM backend: a DICOM whole-slide image (VL Whole Slide Microscopy Image instances, one series per slide, as
the NCI Imaging Data Commons serves TCGA, CPTAC, GTEx and HTAN), read with wsidicom.

A slide is named by its folder of ``.dcm`` instances, or by one instance: then the instances of the same series
beside it are opened with it. wsidicom groups the instances into levels (several instances of a level, such as a
concatenation's parts, are one level) and decodes only the frames a rectangle touches, JPEG, JPEG 2000 (lossless
too) and JPEG-LS through imagecodecs, with or without offset tables. What it cannot assemble is refused here with
the folder and what is missing: no slide instances, a level whose frames or concatenation parts are missing, an
instance that belongs to no level wsidicom could assemble (truncated, or another slide's).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from wsidicom import Settings, WsiDicom
from wsidicom.errors import WsiDicomNotFoundError
from wsidicom.instance import TileType

from distlocal.slides.errors import SlideError
from distlocal.slides.magnification import BaseMagnification, magnification_from_mpp, plausible_mpp
from distlocal.slides.pyramid import Pyramid, read_in_chunks
from distlocal.slides.sniff import is_dicom_file

__all__ = ["DicomLevel", "open_dicom"]

log = logging.getLogger(__name__)

_DECODE_THREADS = min(4, os.cpu_count() or 1)
_CHUNK = (1024, 4096)  # rows, columns of one read_region call: 12 MB of RGB
# wsidicom keeps 100 MB of decoded and 100 MB of encoded frames per slide by default; the read goes band by band
# and needs a frame again only where a band ends inside it, so a few MB keep the memory near the output's size.
_SETTINGS = Settings(decoded_frame_cache_size=16 * 2**20, encoded_frame_cache_size=8 * 2**20)
_REDOWNLOAD = ("download the whole series again (e.g. idc download-from-selection --series-instance-uid ...) into "
               "one folder per slide")


class DicomLevel:
    """One level of the slide's pyramid, however many instances hold it."""

    def __init__(self, wsi: WsiDicom, path: Path, number: int, level: int, shape: tuple[int, int]) -> None:
        self._wsi, self._path, self.number, self._level, self.shape = wsi, path, number, level, shape

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return read_in_chunks(y0, x0, y1, x1, self._read_chunk, _CHUNK)

    def _read_chunk(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        try:
            region = self._wsi.read_region((x0, y0), self._level, (x1 - x0, y1 - y0), as_array=True)
        except Exception as exc:  # wsidicom, pydicom and the codecs each raise their own types
            raise SlideError(self._path, f"corrupt, truncated or missing frames in level {self.number} "
                                         f"({type(exc).__name__}: {exc})", _REDOWNLOAD) from exc
        if region.ndim == 2:
            raise SlideError(self._path, "grayscale DICOM image; distlocal reads RGB brightfield (H&E) slides",
                             "remove it from the manifest")
        return region[..., :3]


def open_dicom(path: str | os.PathLike) -> Pyramid:
    """Open a DICOM-WSI folder, or an instance with its series' siblings; raise SlideError naming what is wrong."""
    path = Path(path)
    files = _series_files(path)
    executor = ThreadPoolExecutor(_DECODE_THREADS) if _DECODE_THREADS > 1 else None
    try:
        wsi = WsiDicom.open(files, read_executor=executor, settings=_SETTINGS)
    except Exception as exc:
        if executor is not None:
            executor.shutdown()
        if isinstance(exc, WsiDicomNotFoundError):
            raise SlideError(path, f"no DICOM whole-slide image in {len(files)} file(s): no VL Whole Slide "
                                   "Microscopy VOLUME instances with a complete level", _REDOWNLOAD) from exc
        raise SlideError(path, f"corrupt or inconsistent DICOM series ({type(exc).__name__}: {exc})",
                         _REDOWNLOAD) from exc
    closers = [wsi.close] + ([executor.shutdown] if executor is not None else [])
    try:
        pyramid = _pyramid(path, wsi, closers)
    except Exception:
        for close in closers:
            close()
        raise
    return pyramid


def _pyramid(path: Path, wsi: WsiDicom, closers: list) -> Pyramid:
    levels = sorted(wsi.levels, key=lambda level: -level.size.width)
    base = levels[0]  # without the scan's own level 0, the largest present: its PixelSpacing gives its magnification
    for level in levels:
        _check_frames(path, level)
    _check_all_used(path, wsi, levels)
    shapes = [(int(lvl.size.height), int(lvl.size.width)) for lvl in levels]
    pyramid_levels = [DicomLevel(wsi, path, n, int(lvl.level), shape)
                      for n, (lvl, shape) in enumerate(zip(levels, shapes, strict=True))]
    compression = base.default_instance.image_data.transfer_syntax.name
    return Pyramid(path, "dicom", pyramid_levels, _base_magnification(base), compression, closers, reader="dicom")


def _check_frames(path: Path, level: object) -> None:
    # TILED_FULL instances place frame i by its index: fewer frames than tiles would shift every tile after a gap,
    # so a level missing frames (or a concatenation part) is refused rather than read with tiles in wrong places.
    if level.default_instance.dataset.tile_type != TileType.FULL:
        return  # TILED_SPARSE: each frame states its position; missing frames are background
    tiled = level.default_instance.dataset.as_dataset()
    rows, cols = int(tiled.Rows), int(tiled.Columns)
    height, width = int(tiled.TotalPixelMatrixRows), int(tiled.TotalPixelMatrixColumns)
    expected = -(-height // rows) * -(-width // cols)
    planes = int(getattr(tiled, "TotalPixelMatrixFocalPlanes", 1) or 1)
    paths = int(getattr(tiled, "NumberOfOpticalPaths", 1) or 1)
    datasets = [part.as_dataset() for instance in level.instances.values() for part in instance.datasets]
    found = sum(int(part.NumberOfFrames) for part in datasets)
    if found < expected * planes * paths:
        parts = getattr(tiled, "InConcatenationTotalNumber", None)
        detail = f" ({len(datasets)} of {parts} concatenation parts present)" if parts else ""
        raise SlideError(path, f"level {height} x {width} is missing frames: {found} of {expected * planes * paths} "
                               f"tiles present{detail}", _REDOWNLOAD)


def _check_all_used(path: Path, wsi: WsiDicom, levels: list) -> None:
    # wsidicom skips files it cannot use; a skipped level instance (truncated, or from another slide) would leave a
    # thinner pyramid or a level read from the wrong slide without a word, so it is named here.
    # Every pyramid counts as used: a series may hold a second one (another imaged area), read as pyramid 0 is not.
    used = {str(part.as_dataset().SOPInstanceUID) for pyramid in wsi.pyramids for level in pyramid
            for instance in level.instances.values() for part in instance.datasets}
    folder = path if path.is_dir() else path.parent
    series = {str(part.as_dataset().SeriesInstanceUID) for level in levels[:1]
              for part in level.default_instance.datasets}
    for file in sorted(folder.iterdir()):
        if not (file.is_file() and is_dicom_file(file)):
            continue
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
            if "SOPInstanceUID" not in header:  # pydicom stops quietly where a cut-short header ends
                raise ValueError("the header ends before SOPInstanceUID")
        except Exception as exc:
            raise SlideError(path, f"instance {file.name} is unreadable ({type(exc).__name__}: {exc}): a truncated "
                                   "download", _REDOWNLOAD) from exc
        image_type = list(header.get("ImageType", []))
        if (str(header.get("SOPInstanceUID", "")) not in used and "VOLUME" in image_type
                and (path.is_dir() or str(header.get("SeriesInstanceUID", "")) in series)):
            size = f"{header.get('TotalPixelMatrixRows', '?')} x {header.get('TotalPixelMatrixColumns', '?')}"
            raise SlideError(path, f"instance {file.name} (a {size} VOLUME level) is not part of any level that "
                                   f"could be assembled: its pixel data is truncated or it belongs to another "
                                   f"slide (series {header.get('SeriesInstanceUID', '?')})", _REDOWNLOAD)


def _base_magnification(base: object) -> BaseMagnification:
    mpp = float(base.mpp.width)
    mpp = mpp if plausible_mpp(mpp) else None
    power = _objective_power(base.default_instance.dataset.as_dataset())
    if power is not None:
        return BaseMagnification(power, mpp, "DICOM ObjectiveLensPower")
    if mpp is not None:
        return BaseMagnification(magnification_from_mpp(mpp), mpp, "DICOM PixelSpacing")
    return BaseMagnification(None, None, "none")


def _objective_power(dataset: pydicom.Dataset) -> float | None:
    for item in getattr(dataset, "OpticalPathSequence", []) or []:
        power = getattr(item, "ObjectiveLensPower", None)
        try:
            if power is not None and float(power) > 0:
                return float(power)
        except (TypeError, ValueError):
            continue
    return None


def _series_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise SlideError(path, "empty folder: a DICOM slide is a folder of its series' .dcm instances",
                             _REDOWNLOAD)
        return files
    if not path.is_file():
        raise SlideError(path, "file not found", "check the path (manifest paths are relative to the manifest's "
                                                 "folder)")
    series = _series_uid(path)
    if series is None:
        raise SlideError(path, "not a readable DICOM file (no SeriesInstanceUID)", _REDOWNLOAD)
    siblings = [f for f in sorted(path.parent.iterdir()) if f != path and f.is_file() and is_dicom_file(f)]
    return [path, *(f for f in siblings if _series_uid(f) == series)]


def _series_uid(path: Path) -> str | None:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # a damaged sibling is left out; wsidicom reports what the series then lacks
        return None
    return str(header.get("SeriesInstanceUID", "")) or None
