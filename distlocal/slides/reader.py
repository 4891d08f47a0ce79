"""
``read_slide``: a slide file to its tissue-cropped RGB image at the target magnification (5X by default).

The read never decodes more than it must: the level chosen is the smallest one at or above the target, tissue is
found on a thumbnail-sized level, and only the tissue's bounding box is read from the chosen level, band by band,
each band resampled to the target as soon as it is read. Peak memory is the 5X output plus one band.

Example:
    >>> slide = read_slide("TCGA-XX.svs")  # doctest: +SKIP
    >>> slide.image.shape, slide.magnification, slide.source_level  # doctest: +SKIP
    ((9216, 14080, 3), 5.0, 1)

"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from distlocal.slides.errors import SlideError
from distlocal.slides.open import open_slide
from distlocal.slides.pyramid import Level, Pyramid
from distlocal.slides.resample import area_weights, resample_band
from distlocal.slides.tissue import MIN_TISSUE_SATURATION, detect_tissue, tissue_bbox

__all__ = ["CropLocation", "ReadPlan", "SlideImage", "locate_crop", "read_resized", "read_shape", "read_slide",
           "slide_info", "upsample_mask"]

_LEVEL_TOLERANCE = 0.02  # level sizes are rounded: the "5X" level of a 20X slide can be 4.999X
_THUMBNAIL_SIDE = 1024  # long side of the image tissue is detected on; a level of half that is used as it is
# A single-level image without magnification is taken to be at the target already (a pre-exported 5X image) unless
# it is larger than this: the 5X image of even a 100,000-pixel 20X slide is 25,000 pixels.
_LARGEST_UNLABELLED_SIDE = 32768
_NO_MAGNIFICATION_WHERE = {"tifffile": "no AppMag, MPP, resolution tags or OME PhysicalSizeX",
                           "openslide": "no openslide.objective-power or openslide.mpp-x",
                           "dicom": "no PixelSpacing or ObjectiveLensPower"}
_BAND_INPUT_ROWS = 256  # rows of the source level decoded and resampled at a time
_NO_MAGNIFICATION_FIX = ("set data.base_magnification to the scan's objective (e.g. 20 or 40), or data.level to the "
                         "pyramid level to read as it is")


@dataclass
class SlideImage:
    """
    A slide read at the target magnification, cropped to its tissue.

    ``bbox`` is ``(y0, x0, y1, x1)`` of the crop in the whole slide's pixels at ``magnification``, so heatmaps can
    be placed back on the slide.
    """

    image: np.ndarray  # uint8, H x W x 3, RGB
    mask: np.ndarray  # bool, H x W, tissue
    magnification: float
    source_level: int
    bbox: tuple[int, int, int, int]
    reader: str = ""  # the backend that read it (tifffile, openslide, dicom); "" for a crop from an old cache entry


@dataclass(frozen=True)
class ReadPlan:
    level: int
    shape: tuple[int, int]  # the whole slide's size at the output magnification
    magnification: float


def read_slide(path: str | os.PathLike, magnification: float = 5.0, level: int | None = None,
               base_magnification: float | None = None, crop_tissue: bool = True,
               tissue_margin: float = 0.02, reader: str = "auto") -> SlideImage:
    """
    Read a slide at ``magnification``, cropped to its tissue: SVS, pyramidal TIFF, OME-TIFF, PNG, JPEG (tifffile),
    a DICOM-WSI folder or instance (wsidicom), MRXS, NDPI, SCN, Philips TIFF, BIF (OpenSlide).

    ``level`` forces the pyramid level read (``data.level``); ``base_magnification`` overrides the level 0
    magnification found in the metadata (``data.base_magnification``). ``tissue_margin`` is the margin kept around
    the tissue's bounding box, as a fraction of the slide's side. Raises SlideError for any unreadable slide,
    including one with no tissue. ``reader`` (``data.reader``) forces a backend; ``auto`` picks one per file.
    """
    with open_slide(path, reader) as pyramid:
        where = locate_crop(pyramid, magnification, level, base_magnification, crop_tissue, tissue_margin)
        plan, box = where.plan, where.box
        if where.thumbnail is not None:
            image = where.thumbnail[box[0] : box[2], box[1] : box[3]].copy()  # small slide: the thumbnail is it
        else:
            image = read_resized(pyramid.levels[plan.level], plan.shape, box)
        mask = upsample_mask(where.tissue, plan.shape, box)
    return SlideImage(image, mask, plan.magnification, plan.level, box, pyramid.reader)


@dataclass(frozen=True)
class CropLocation:
    """Where a slide's tissue crop lies: the level read, its size at the target, the crop box, the tissue mask."""

    plan: ReadPlan
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1) at the target magnification
    tissue: np.ndarray  # bool, the thumbnail's tissue mask (upsample_mask scales it to any box)
    thumbnail: np.ndarray | None  # the thumbnail when it is the image itself (a small slide), else None


def locate_crop(pyramid: Pyramid, magnification: float = 5.0, level: int | None = None,
                base_magnification: float | None = None, crop_tissue: bool = True,
                tissue_margin: float = 0.02) -> CropLocation:
    """
    read_slide's plan without the read: the level, the crop box from tissue found on a thumbnail-sized (low
    resolution) level. Raises SlideError for a slide without tissue.
    """
    if magnification <= 0 or (base_magnification is not None and base_magnification <= 0):
        raise ValueError(f"magnifications must be positive, got magnification={magnification}, "
                         f"base_magnification={base_magnification}")
    plan = _plan_read(pyramid, magnification, level, base_magnification)
    thumb_level = _thumbnail_level(pyramid.levels, plan.level)
    thumb_shape = _thumbnail_shape(pyramid.levels[thumb_level].shape)
    thumbnail = read_resized(pyramid.levels[thumb_level], thumb_shape, (0, 0, *thumb_shape))
    tissue = detect_tissue(thumbnail)
    if not tissue.found:
        raise SlideError(pyramid.path, f"no tissue found: no region has HSV saturation above "
                                       f"{tissue.threshold:.0f}/255 (Otsu threshold, floor "
                                       f"{MIN_TISSUE_SATURATION})", "check that it is a brightfield H&E "
                                       "scan, or remove it from the manifest")
    box = (0, 0, *plan.shape)
    if crop_tissue:
        box = _scale_box(tissue_bbox(tissue.mask, tissue_margin), thumb_shape, plan.shape)
    small = thumb_level == plan.level and thumb_shape == plan.shape
    return CropLocation(plan, box, tissue.mask, thumbnail if small else None)


def read_shape(path: str | os.PathLike, magnification: float = 5.0, level: int | None = None,
               base_magnification: float | None = None, reader: str = "auto") -> tuple[int, int]:
    """
    The whole slide's (height, width) at ``magnification`` as read_slide would read it, from the file's level
    dimensions alone (no pixel decoded): its tissue crop is at most this.
    """
    with open_slide(path, reader) as pyramid:
        return _plan_read(pyramid, magnification, level, base_magnification).shape


def slide_info(path: str | os.PathLike, reader: str = "auto") -> dict:
    """
    What distlocal sees in a slide file: format, level shapes, magnification and where it was found.

    Example:
        >>> slide_info("TCGA-XX.svs")  # doctest: +SKIP
        {'path': 'TCGA-XX.svs', 'reader': 'tifffile', 'format': 'svs',
         'levels': [(36864, 56320), (9216, 14080), (2304, 3520)], 'level_magnifications': [20.0, 5.0, 1.25],
         'base_magnification': 20.0, 'mpp': 0.499,
         'magnification_source': 'AppMag', 'compression': 'JPEG'}

    """
    with open_slide(path, reader) as pyramid:
        base = pyramid.base.magnification
        shapes = [level.shape for level in pyramid.levels]
        return {
            "path": str(pyramid.path),
            "reader": pyramid.reader,
            "format": pyramid.format,
            "levels": shapes,
            "level_magnifications": None if base is None else [base * w / shapes[0][1] for _, w in shapes],
            "base_magnification": base,
            "mpp": pyramid.base.mpp,
            "magnification_source": pyramid.base.source,
            "compression": pyramid.compression,
        }


def _plan_read(pyramid: Pyramid, target: float, level: int | None, base: float | None) -> ReadPlan:
    shapes = [lvl.shape for lvl in pyramid.levels]
    if level is not None and not 0 <= level < len(shapes):
        raise SlideError(pyramid.path, f"level {level} does not exist: the slide has {len(shapes)} level(s) "
                                       f"{shapes}", f"set data.level between 0 and {len(shapes) - 1}, or unset it")
    base = base if base is not None else pyramid.base.magnification
    if base is None:
        if level is not None:  # the user says this level is what they want
            return ReadPlan(level, shapes[level], target)
        if len(shapes) > 1:
            raise SlideError(pyramid.path, f"pyramidal slide ({len(shapes)} levels) without magnification in its "
                                           f"metadata ({_NO_MAGNIFICATION_WHERE.get(pyramid.reader, '')})",
                             _NO_MAGNIFICATION_FIX)
        if max(shapes[0]) > _LARGEST_UNLABELLED_SIDE:
            raise SlideError(pyramid.path, f"{shapes[0][0]} x {shapes[0][1]} image without magnification in its "
                                           "metadata, too large to be a pre-exported image at the target "
                                           "magnification", _NO_MAGNIFICATION_FIX)
        base = target  # a plain image: already at the target magnification
    magnifications = [base * w / shapes[0][1] for _, w in shapes]
    if level is None:
        above = [i for i, m in enumerate(magnifications) if m >= target * (1 - _LEVEL_TOLERANCE)]
        level = min(above, key=lambda i: magnifications[i]) if above else 0
    found = magnifications[level]
    if found <= target * (1 + _LEVEL_TOLERANCE):  # at the target, or below it: never upsample
        return ReadPlan(level, shapes[level], target if found >= target * (1 - _LEVEL_TOLERANCE) else found)
    scale = target / found
    height, width = shapes[level]
    return ReadPlan(level, (max(1, round(height * scale)), max(1, round(width * scale))), target)


def _thumbnail_level(levels: list[Level], source: int) -> int:
    # The smallest level at or below the source that still shows tissue clearly; never one larger than the source.
    for index in range(len(levels) - 1, source - 1, -1):
        if max(levels[index].shape) >= _THUMBNAIL_SIDE // 2:
            return index
    return source


def _thumbnail_shape(shape: tuple[int, int]) -> tuple[int, int]:
    scale = min(1.0, _THUMBNAIL_SIDE / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def read_resized(level: Level, shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels ``box`` of ``level`` area-resampled to ``shape`` (the whole level's output size), band by band."""
    y0, x0, y1, x1 = box
    if shape == level.shape:
        return level.read(y0, x0, y1, x1)
    cols = area_weights(level.shape[1], shape[1], x0, x1)
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    step = max(1, math.floor(_BAND_INPUT_ROWS * shape[0] / level.shape[0]))
    for y in range(y0, y1, step):
        stop = min(y + step, y1)
        rows = area_weights(level.shape[0], shape[0], y, stop)
        band = level.read(rows.start, cols.start, rows.stop, cols.stop)
        out[y - y0 : stop - y0] = resample_band(band, rows, cols)
    return out


def _scale_box(box: tuple[int, int, int, int], small: tuple[int, int],
               large: tuple[int, int]) -> tuple[int, int, int, int]:
    # Round outwards: a thumbnail pixel with tissue keeps all the output pixels it covers.
    fy, fx = large[0] / small[0], large[1] / small[1]
    return (max(0, math.floor(box[0] * fy)), max(0, math.floor(box[1] * fx)),
            min(large[0], math.ceil(box[2] * fy)), min(large[1], math.ceil(box[3] * fx)))


def upsample_mask(mask: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    # Nearest neighbour by pixel centres: the thumbnail mask is smooth already, and this stays output-sized.
    rows = ((np.arange(box[0], box[2]) + 0.5) * mask.shape[0] / shape[0]).astype(np.int64)
    cols = ((np.arange(box[1], box[3]) + 0.5) * mask.shape[1] / shape[1]).astype(np.int64)
    return mask[np.minimum(rows, mask.shape[0] - 1)][:, np.minimum(cols, mask.shape[1] - 1)]
