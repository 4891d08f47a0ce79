"""
``open_slide``: the one place that picks a slide's reader from what the file is (``data.reader: auto``), or takes
the one the user forces.

- tifffile (slides/pyramid.py): SVS, generic pyramidal TIFF, OME-TIFF, PNG, JPEG; it decodes only the tiles a
  rectangle touches, on threads.
- dicom (slides/dicom_reader.py): a DICOM-WSI folder, or one of its instances.
- openslide (slides/openslide_reader.py): what OpenSlide recognises and tifffile does not read region by region:
  MRXS, NDPI (one JPEG per level: tifffile would decode it whole), SCN, Philips TIFF, Ventana BIF, VMS, ...

Example:
    >>> with open_slide("TCGA-XX/") as pyramid:  # doctest: +SKIP
    ...     pyramid.reader, pyramid.format, [level.shape for level in pyramid.levels]
    ('dicom', 'dicom', [(36864, 56320), (9216, 14080), (2304, 3520)])

"""

from __future__ import annotations

import os
from pathlib import Path

from distlocal.slides.errors import SlideError
from distlocal.slides.pyramid import Pyramid, open_pyramid
from distlocal.slides.sniff import is_dicom_file, is_tiff_file

__all__ = ["READERS", "choose_reader", "open_slide"]

READERS = ("auto", "tifffile", "openslide", "dicom")
# TIFF-based scanner formats that OpenSlide reads and tifffile does not read region by region (or at all).
_OPENSLIDE_TIFF_VENDORS = ("hamamatsu", "leica", "philips", "ventana")


def _open_openslide(path: str | os.PathLike) -> Pyramid:
    from distlocal.slides.openslide_reader import open_openslide  # deferred: only slides that need it pay for it

    return open_openslide(path)


def _open_dicom(path: str | os.PathLike) -> Pyramid:
    from distlocal.slides.dicom_reader import open_dicom  # deferred: importing wsidicom and pydicom takes seconds

    return open_dicom(path)


_OPENERS = {"tifffile": open_pyramid, "openslide": _open_openslide, "dicom": _open_dicom}


def choose_reader(path: str | os.PathLike) -> str:
    """
    The reader ``auto`` uses for ``path``, from its headers only: "tifffile", "openslide" or "dicom".

    Files no reader recognises go to tifffile, whose error names what the file is not.
    """
    path = Path(path)
    if path.is_dir() or (path.is_file() and is_dicom_file(path)):
        return "dicom"
    if not path.is_file():
        return "tifffile"  # its error names the missing file
    if path.suffix.lower() == ".mrxs":
        return "openslide"  # only OpenSlide reads MRXS; its error names a missing data folder
    from distlocal.slides.openslide_reader import openslide_vendor

    vendor = openslide_vendor(path)
    if is_tiff_file(path):
        return "openslide" if vendor in _OPENSLIDE_TIFF_VENDORS else "tifffile"
    return "openslide" if vendor is not None else "tifffile"


def open_slide(path: str | os.PathLike, reader: str = "auto") -> Pyramid:
    """Open a slide with ``reader`` (``data.reader``); ``auto`` chooses by what the file is. Raises SlideError."""
    if reader not in READERS:
        raise SlideError(path, f"unknown reader {reader!r}", f"set data.reader to one of {', '.join(READERS)}")
    chosen = choose_reader(path) if reader == "auto" else reader
    if reader == "tifffile" and Path(path).is_dir():
        raise SlideError(path, "is a folder: tifffile reads single files", "set data.reader=dicom (or auto) for a "
                                                                            "DICOM-WSI folder")
    return _OPENERS[chosen](path)
