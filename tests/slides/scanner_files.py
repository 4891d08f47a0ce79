"""
Scanner formats written as their TIFF layouts with tifffile, with the tags and XML OpenSlide detects them by:
Hamamatsu NDPI (one JPEG per level, NDPI tags 65420-65424), Leica SCN (BigTIFF, a collection XML placing the main
image on the slide), Philips TIFF (Software "Philips", a DPUfsImport XML with each level's pixel spacing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

_JPEG = {"compression": "jpeg", "compressionargs": {"level": 95}, "photometric": "rgb", "metadata": None}


def write_ndpi(path: Path, levels: list[np.ndarray], magnification: float = 20.0, mpp: float = 0.5) -> Path:
    """NDPI: each level one JPEG strip with the NDPI tags; resolution tags give the microns per pixel."""
    with tifffile.TiffWriter(path) as tiff:
        for level in levels:
            pixels_per_cm = 10000 / (mpp * levels[0].shape[1] / level.shape[1])
            ndpi = [(65420, 4, 1, 1, True), (65421, 11, 1, magnification, True), (65422, 9, 1, 0, True),
                    (65423, 9, 1, 0, True), (65424, 9, 1, 0, True)]
            tiff.write(level, rowsperstrip=level.shape[0], resolution=(pixels_per_cm, pixels_per_cm),
                       resolutionunit="CENTIMETER", extratags=ndpi, **_JPEG)
    return path


_SCN_XML = """<?xml version="1.0"?>
<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">
<collection name="slide" uuid="00000000-0000-0000-0000-000000000001" sizeX="{cx}" sizeY="{cy}">
<image name="main" uuid="00000000-0000-0000-0000-000000000002">
<creationDate>2026-01-01T00:00:00.00Z</creationDate>
<device model="Leica SCN400;Leica SCN" version="1.5.1.10864 2012/05/10 13:29:07;1.5.1.10804"/>
<pixels sizeX="{w}" sizeY="{h}">{dimensions}</pixels>
<view sizeX="{vx}" sizeY="{vy}" offsetX="{ox}" offsetY="{oy}" spacingZ="0"/>
<scanSettings><objectiveSettings><objective>{objective:g}</objective></objectiveSettings>
<illuminationSettings><numericalAperture>0.7</numericalAperture>
<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>
</image>
<image name="macro" uuid="00000000-0000-0000-0000-000000000003">
<pixels sizeX="{mw}" sizeY="{mh}"><dimension sizeX="{mw}" sizeY="{mh}" r="0" ifd="{macro_ifd}"/></pixels>
<view sizeX="{cx}" sizeY="{cy}" offsetX="0" offsetY="0" spacingZ="0"/>
<scanSettings><illuminationSettings><illuminationSource>brightfield</illuminationSource></illuminationSettings>
</scanSettings>
</image>
</collection>
</scn>"""


def write_scn(path: Path, levels: list[np.ndarray], objective: float = 20.0, mpp: float = 0.5,
              margin_um: float = 16.0) -> Path:
    """
    SCN: the main image's levels then a macro image, placed ``margin_um`` inside a collection (the slide).

    (OpenSlide 4.0.1 crashes, SIGSEGV, on a main image without ``objectiveSettings``: real scans always have it.)
    """
    h, w = levels[0].shape[:2]
    nm = mpp * 1000
    margin = round(margin_um * 1000)
    dimensions = "".join(f'<dimension sizeX="{lvl.shape[1]}" sizeY="{lvl.shape[0]}" r="{r}" ifd="{r}"/>'
                         for r, lvl in enumerate(levels))
    cx, cy = round(w * nm) + 2 * margin, round(h * nm) + 2 * margin
    macro = np.full((32, 32, 3), 230, np.uint8)
    xml = _SCN_XML.format(cx=cx, cy=cy, w=w, h=h, dimensions=dimensions, vx=round(w * nm), vy=round(h * nm),
                          ox=margin, oy=margin, objective=objective, mw=32, mh=32, macro_ifd=len(levels))
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for r, level in enumerate(levels):
            pixels_per_cm = 10000 / (mpp * w / level.shape[1])
            tiff.write(level, tile=(64, 64), description=xml if r == 0 else None,
                       resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER", **_JPEG)
        tiff.write(macro, tile=(16, 16), **_JPEG)
    return path


def _philips_attribute(name: str, kind: str, value: str) -> str:
    return f'<Attribute Name="{name}" PMSVR="{kind}">{value}</Attribute>'


def _philips_spacing(mm: float) -> str:
    return _philips_attribute("DICOM_PIXEL_SPACING", "IDoubleArray", f"&quot;{mm:g}&quot; &quot;{mm:g}&quot;")


def write_philips(path: Path, levels: list[np.ndarray], mpp: float = 0.5, tile: int = 64) -> Path:
    """Philips TIFF: Software "Philips", a DPUfsImport XML giving each level's pixel spacing (in mm)."""
    representations = []
    for number, level in enumerate(levels):
        spacing = mpp * levels[0].shape[1] / level.shape[1] / 1000
        representations.append(
            '<DataObject ObjectType="PixelDataRepresentation">'
            + _philips_spacing(spacing)
            + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", "IUInt16", str(number))
            + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_COLUMNS", "IUInt32", str(level.shape[1]))
            + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_ROWS", "IUInt32", str(level.shape[0]))
            + "</DataObject>")
    xml = ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
           + _philips_attribute("DICOM_MANUFACTURER", "IString", "PHILIPS")
           + '<Attribute Name="PIM_DP_SCANNED_IMAGES" PMSVR="IDataObjectArray"><Array>'
           + '<DataObject ObjectType="DPScannedImage">'
           + _philips_spacing(mpp / 1000)
           + _philips_attribute("PIM_DP_IMAGE_TYPE", "IString", "WSI")
           + '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" PMSVR="IDataObjectArray"><Array>'
           + "".join(representations) + "</Array></Attribute></DataObject></Array></Attribute></DataObject>")
    with tifffile.TiffWriter(path) as tiff:
        for number, level in enumerate(levels):
            tiff.write(level, tile=(tile, tile), description=xml if number == 0 else None,
                       software="Philips DP v1.0" if number == 0 else None, subfiletype=1 if number else 0, **_JPEG)
    return path
