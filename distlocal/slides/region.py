"""
A slide's tissue crop read by region: its shape at the read magnification and ``read(y0, y1, x0, x1)``, so a 20X
crop is never decoded whole into memory (model.stream: stage 1 reads the regions its tiles need).

Two sources, both small and picklable (a loader hands one to stage 1, in this process or through Ray's object store;
the file is opened again, lazily, where it is read):
- ``CachedRegions``: a prepared cache entry (slides/cache.py). Its TIFF is tiled (512, zstd), so a region decodes
  only the tiles it touches (pyramid.TiffLevel). Exact: the same pixels as the whole page.
- ``OriginalRegions``: the original slide, read at the planned level and area-resampled to the target as
  read_slide does (reader.read_resized). Each output pixel's weights and summation order depend only on that pixel
  (resample.area_weights), so a region equals the slice of the whole read exactly with the tifffile and DICOM
  readers. With OpenSlide a region's corner on a level whose downsample is not a whole number maps to a fractional
  level-0 position that OpenSlide interpolates (openslide_reader.py): pixels within 1 / (2 x downsample) of a pixel
  of the whole read's, which is OpenSlide's own seam tolerance; on whole-number downsamples it is exact too.

Example:
    >>> regions = OriginalRegions.open("slide.tiff", magnification=20)  # doctest: +SKIP
    >>> regions.shape, regions.read(0, 512, 0, 512).shape  # doctest: +SKIP
    ((41028, 95396), (512, 512, 3))

"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import tifffile

from distlocal.slides.errors import SlideError
from distlocal.slides.open import open_slide
from distlocal.slides.pyramid import DECODE_THREADS, Pyramid, TiffLevel
from distlocal.slides.reader import ReadPlan, locate_crop, read_resized, upsample_mask

__all__ = ["BAND_BYTES", "TILE", "CachedRegions", "OriginalRegions", "RegionSource", "bands", "channel_sums",
           "crop_tile_sums", "thumbnail", "thumbnail_step", "tile_sums"]

BAND_BYTES = 64 * 2**20  # RGB bytes of one band of rows read at a time by whole-crop passes (sums, prepare)
TILE = 512  # the cache TIFF's tile side (slides/cache.py)
_PREPARE_AGAIN = "delete it, or run distlocal prepare again with --force"


class RegionSource(Protocol):
    """A uint8 RGB crop read by region; ``shape`` is (rows, cols) at the read magnification."""

    shape: tuple[int, int]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass
class CachedRegions:
    """A cache entry's crop (page 0 of its tiled TIFF), read tile by tile."""

    path: Path
    shape: tuple[int, int]
    # Each 512 x 512 tile's int64 R, G, B sums (rows x cols x 3) from the entry's JSON (prepare writes them), so the
    # contrast jitter's mean grey of a crop decodes only the tiles on its border; None for older entries.
    tile_sums: np.ndarray | None = field(default=None, repr=False, compare=False)
    # (TiffFile, {page: TiffLevel}, threads) once read
    _open: tuple | None = field(default=None, repr=False, compare=False)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._read(0, y0, y1, x0, x1)

    def mask(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The tissue mask of a region (bool), from the entry's second page."""
        return self._read(1, y0, y1, x0, x1)[..., 0] > 0

    def _read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        _check_region(self, y0, y1, x0, x1)
        try:
            return self._level(page).read(y0, x0, y1, x1)
        except SlideError as exc:  # the tile's own fix speaks of the original slide: this file is ours to rewrite
            raise SlideError(self.path, f"cache entry is damaged: {exc.problem}", _PREPARE_AGAIN) from None

    def _level(self, page: int) -> TiffLevel:
        try:
            if self._open is None:
                tif = tifffile.TiffFile(self.path)
                # zstd releases the GIL: a stem tile's 16 or more tiles decode on a few threads, as a slide's do
                self._open = (tif, {}, ThreadPoolExecutor(DECODE_THREADS) if DECODE_THREADS > 1 else None)
            tif, levels, threads = self._open
            if page not in levels:
                levels[page] = TiffLevel(self.path, tif, tif.pages[page], page, threads, rgb=page == 0)
            return levels[page]
        except Exception as exc:  # tifffile raises many types for a damaged file
            self.close()
            raise SlideError(self.path, f"cache entry is damaged ({type(exc).__name__}: {exc})", _PREPARE_AGAIN) \
                from None

    def close(self) -> None:
        if self._open is not None:
            tif, _, threads = self._open
            tif.close()
            if threads is not None:
                threads.shutdown()
            self._open = None

    def __getstate__(self) -> dict:
        # An open file does not travel (it opens again where it is read), nor the sums: the loader used them.
        return {**self.__dict__, "_open": None, "tile_sums": None}


@dataclass
class OriginalRegions:
    """The tissue crop of an original slide at the target magnification, read and resampled region by region."""

    path: Path
    reader: str  # data.reader: the backend to open it with
    plan: ReadPlan
    box: tuple[int, int, int, int]  # the crop in the whole slide at the target: (y0, x0, y1, x1)
    tissue: np.ndarray | None  # the thumbnail's tissue mask (for prepare's mask page; it does not travel)
    opened_by: str = ""  # the backend that opened it (tifffile, openslide, dicom)
    _pyramid: Pyramid | None = field(default=None, repr=False, compare=False)
    # As CachedRegions': set by the loader from the sums it keeps per original (data/original_sums.py)
    tile_sums: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | os.PathLike, magnification: float = 5.0, level: int | None = None,
             base_magnification: float | None = None, reader: str = "auto") -> OriginalRegions:
        """Plan the read as read_slide does (tissue from a low-resolution level); no pixel of the crop is read."""
        pyramid = open_slide(path, reader)
        try:
            where = locate_crop(pyramid, magnification, level, base_magnification)
        except BaseException:
            pyramid.close()
            raise
        return cls(Path(path), reader, where.plan, where.box, where.tissue, pyramid.reader, pyramid)

    @property
    def shape(self) -> tuple[int, int]:
        y0, x0, y1, x1 = self.box
        return y1 - y0, x1 - x0

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        _check_region(self, y0, y1, x0, x1)
        if self._pyramid is None:
            self._pyramid = open_slide(self.path, self.reader)
        top, left = self.box[:2]
        level = self._pyramid.levels[self.plan.level]
        return read_resized(level, self.plan.shape, (top + y0, left + x0, top + y1, left + x1))

    def mask(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The tissue mask of a region (bool), as read_slide's whole mask sliced there (where it was opened)."""
        if self.tissue is None:
            raise ValueError("the tissue mask stays where the slide was opened: call mask() before pickling")
        top, left = self.box[:2]
        return upsample_mask(self.tissue, self.plan.shape, (top + y0, left + x0, top + y1, left + x1))

    def close(self) -> None:
        if self._pyramid is not None:
            self._pyramid.close()
            self._pyramid = None

    def __getstate__(self) -> dict:
        # stage 1 reads pixels only: a few hundred bytes
        return {**self.__dict__, "_pyramid": None, "tissue": None, "tile_sums": None}


def _check_region(source: RegionSource, y0: int, y1: int, x0: int, x1: int) -> None:
    height, width = source.shape
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"region rows {y0}:{y1}, columns {x0}:{x1} is not inside the {height} x {width} crop")


def bands(height: int, width: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """Row bands (y0, y1) of about BAND_BYTES of RGB each, their starts multiples of ``multiple``."""
    rows = max(multiple, BAND_BYTES // max(1, 3 * width) // multiple * multiple)
    for y in range(0, height, rows):
        yield y, min(y + rows, height)


def channel_sums(source: RegionSource, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """
    The int64 sums of R, G and B over rows y0:y1, columns x0:x1: integers, so exact in any order (the contrast
    jitter's mean grey comes from them, data/augment.py). From a cache entry's tile sums where a tile lies wholly
    inside (then only a frame of border tiles is decoded), else read band by band (one pass over the region).
    """
    table = getattr(source, "tile_sums", None)
    if table is None:
        return _read_sums(source, y0, y1, x0, x1)
    (r0, r1, top, bottom), (c0, c1, left, right) = (_inner(a, b, n) for a, b, n in zip(
        (y0, x0), (y1, x1), source.shape, strict=True))
    if r1 <= r0 or c1 <= c0:
        return _read_sums(source, y0, y1, x0, x1)
    total = table[r0:r1, c0:c1].sum(axis=(0, 1), dtype=np.int64)
    for a, b, c, d in ((y0, top, x0, x1), (bottom, y1, x0, x1), (top, bottom, x0, left), (top, bottom, right, x1)):
        if b > a and d > c:
            total += _read_sums(source, a, b, c, d)
    return total


def _inner(start: int, stop: int, length: int) -> tuple[int, int, int, int]:
    """Along one axis: the tiles first..last-1 wholly inside start:stop, and the pixels they span."""
    first = -(-start // TILE)
    last = -(-length // TILE) if stop == length else stop // TILE  # the last tile of the axis may be short
    return first, last, first * TILE, min(last * TILE, length)


def _read_sums(source: RegionSource, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    total = np.zeros(3, dtype=np.int64)
    for top, bottom in bands(y1 - y0, x1 - x0):
        total += source.read(y0 + top, y0 + bottom, x0, x1).sum(axis=(0, 1), dtype=np.int64)
    return total


def crop_tile_sums(source: RegionSource) -> np.ndarray:
    """
    Each TILE x TILE tile's int64 R, G, B sums over the whole crop (rows x cols x 3, the table prepare stores in a
    cache entry), in one band-by-band pass: channel_sums then decodes only a frame of border tiles.
    """
    height, width = source.shape
    rows = []
    for y0, y1 in bands(height, width, multiple=TILE):
        band = source.read(y0, y1, 0, width)
        rows.extend(tile_sums(band[y:y + TILE]) for y in range(0, y1 - y0, TILE))
    return np.stack(rows)


def tile_sums(band: np.ndarray) -> np.ndarray:
    """The int64 R, G, B sums of each TILE-wide column chunk of a band of TILE rows: (chunks x 3)."""
    return np.stack([band[:, x:x + TILE].sum(axis=(0, 1), dtype=np.int64)
                     for x in range(0, band.shape[1], TILE)])


def thumbnail_step(shape: tuple[int, int]) -> int:
    """The stride of a heatmap's thumbnail of a slide of ``shape``: a thumbnail is enough to see the tissue."""
    return max(1, max(shape) // 1024)


def thumbnail(source: RegionSource, step: int) -> np.ndarray:
    """``crop[::step, ::step]`` read band by band (the heatmap's picture of a slide that is never whole)."""
    height, width = source.shape
    parts = [source.read(y0, y1, 0, width)[::step, ::step] for y0, y1 in bands(height, width, multiple=step)]
    return np.concatenate(parts, axis=0)
