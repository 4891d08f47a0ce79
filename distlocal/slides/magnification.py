"""
Finding a slide's base (level 0) magnification in its metadata.

Sources, in order of trust: the Aperio ``AppMag`` (what the scanner's objective was), the Aperio ``MPP``, the TIFF
resolution tags, the OME ``PhysicalSizeX``. Microns per pixel become a magnification by the field's convention
``magnification = 10 / mpp`` (0.25 um/px is 40X, 0.5 um/px is 20X).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.etree import ElementTree

import tifffile

__all__ = ["BaseMagnification", "find_base_magnification", "magnification_from_mpp", "plausible_mpp"]

# Objectives that scanners use; a magnification derived from a measured mpp (0.2527 um/px, 0.504 um/px) is snapped
# to the nearest one when within _SNAP_TOLERANCE, so that the pyramid's 4x levels land exactly on 5X instead of a
# hair below it, which would force reading the next (4x larger) level.
_STANDARD_MAGNIFICATIONS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)
_SNAP_TOLERANCE = 0.1
# Resolution tags outside this range (e.g. 72 dpi from an image editor, 352 um/px) are not a microscope's.
_PLAUSIBLE_MPP = (0.05, 20.0)
_UNIT_MICRONS = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0, "mm": 1000.0, "um": 1.0, "µm": 1.0,
                 "nm": 0.001}


@dataclass(frozen=True)
class BaseMagnification:
    """What the metadata says about level 0; ``magnification`` is None when nothing was found."""

    magnification: float | None
    mpp: float | None
    source: str  # "AppMag", "MPP", "resolution tags", "OME PhysicalSizeX" or "none"


def magnification_from_mpp(mpp: float) -> float:
    """
    Objective magnification for microns per pixel, snapped to a standard objective when close.

    Example:
        >>> magnification_from_mpp(0.2527), magnification_from_mpp(0.5), magnification_from_mpp(0.8)
        (40.0, 20.0, 12.5)

    """
    magnification = 10.0 / mpp
    nearest = min(_STANDARD_MAGNIFICATIONS, key=lambda m: abs(m - magnification))
    if abs(magnification - nearest) <= _SNAP_TOLERANCE * nearest:
        return nearest
    return magnification


def find_base_magnification(tif: tifffile.TiffFile) -> BaseMagnification:
    """Level 0 magnification of an open TIFF from the first source that has one."""
    page = tif.pages.first
    description = page.description or ""
    app_mag = _aperio_field(description, "AppMag")
    mpp = _aperio_field(description, "MPP")
    if app_mag is not None and app_mag > 0:
        return BaseMagnification(app_mag, mpp, "AppMag")
    if mpp is not None and plausible_mpp(mpp):
        return BaseMagnification(magnification_from_mpp(mpp), mpp, "MPP")
    mpp = _resolution_tag_mpp(page)
    if mpp is not None:
        return BaseMagnification(magnification_from_mpp(mpp), mpp, "resolution tags")
    mpp = _ome_mpp(tif.ome_metadata) if tif.is_ome else None
    if mpp is not None:
        return BaseMagnification(magnification_from_mpp(mpp), mpp, "OME PhysicalSizeX")
    return BaseMagnification(None, None, "none")


def _aperio_field(description: str, name: str) -> float | None:
    # Aperio descriptions are "Aperio Image Library ...|AppMag = 20|MPP = 0.4990|..."; other vendors copy the style.
    match = re.search(rf"(?:^|\|)\s*{name}\s*=\s*([0-9.eE+-]+)", description)
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def plausible_mpp(mpp: float) -> bool:
    """Whether microns per pixel are a microscope's, not an image editor's 72 dpi."""
    return _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]


def _resolution_tag_mpp(page: tifffile.TiffPage) -> float | None:
    unit = {tifffile.RESUNIT.INCH: "inch", tifffile.RESUNIT.CENTIMETER: "centimeter"}.get(page.resolutionunit)
    if unit is None:  # RESUNIT.NONE: tifffile writes (1, 1) with no unit by default
        return None
    pixels_per_unit = page.resolution[0]
    if not pixels_per_unit or pixels_per_unit <= 0:
        return None
    mpp = _UNIT_MICRONS[unit] / pixels_per_unit
    return mpp if plausible_mpp(mpp) else None


def _ome_mpp(xml: str | None) -> float | None:
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            size = element.get("PhysicalSizeX")
            unit = element.get("PhysicalSizeXUnit", "µm")
            if size is None or unit not in _UNIT_MICRONS:
                return None
            try:
                mpp = float(size) * _UNIT_MICRONS[unit]
            except ValueError:
                return None
            return mpp if plausible_mpp(mpp) else None
    return None
