"""
Opening a slide file as a pyramid of levels that read rectangles, decoding only the tiles they touch.

tifffile finds the levels (Aperio SVS page chains, SubIFD pyramids, OME-TIFF, reduced pages); the tiles of a
rectangle are read by their byte offsets and decoded with tifffile's own decoder, on a few threads since the
codecs release the GIL. (tifffile's zarr view would do the same, but needs zarr, which is not a dependency.)
PNG and JPEG files are small pre-exported images and are decoded whole.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import imagecodecs
import numpy as np
import tifffile

from distlocal.slides.errors import SlideError
from distlocal.slides.magnification import BaseMagnification, find_base_magnification

__all__ = ["DECODE_THREADS", "ArrayLevel", "Level", "Pyramid", "TiffLevel", "open_pyramid", "read_in_chunks"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg"}
DECODE_THREADS = min(4, os.cpu_count() or 1)
_REEXPORT = "re-download the slide or re-export it (e.g. with vips tiffsave --tile --pyramid --compression jpeg)"


class Level(Protocol):
    """One resolution of a slide: ``shape`` is (rows, cols); ``read`` returns that rectangle as HxWx3 uint8 RGB."""

    shape: tuple[int, int]

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray: ...



def read_in_chunks(y0: int, x0: int, y1: int, x1: int, read_chunk, chunk: tuple[int, int]) -> np.ndarray:
    """
    Rows y0:y1, columns x0:x1 as RGB, assembled from ``read_chunk(top, left, bottom, right)`` calls of at most
    ``chunk`` (rows, columns): a reader whose library returns a whole region per call keeps its memory near the
    output's size.
    """
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    for top in range(y0, y1, chunk[0]):
        bottom = min(top + chunk[0], y1)
        for left in range(x0, x1, chunk[1]):
            right = min(left + chunk[1], x1)
            out[top - y0 : bottom - y0, left - x0 : right - x0] = read_chunk(top, left, bottom, right)
    return out


class ArrayLevel:
    """A level already in memory (a decoded PNG or JPEG)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.shape = (int(image.shape[0]), int(image.shape[1]))

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self.image[y0:y1, x0:x1].copy()


class TiffLevel:
    """A TIFF page read tile by tile (or strip by strip); the last tile row read is kept for the next band."""

    def __init__(self, slide: Path, tif: tifffile.TiffFile, page: tifffile.TiffPage, number: int,
                 executor: ThreadPoolExecutor | None, rgb: bool = True) -> None:
        if rgb:  # else a one-channel page of our own (a cache entry's mask), returned in each of the 3 channels
            _check_page(slide, page, number)
        self.slide, self.number, self._tif, self._page, self._executor = slide, number, tif, page, executor
        self.shape = (int(page.imagelength), int(page.imagewidth))
        if page.is_tiled:
            self._segment = (int(page.tilelength), int(page.tilewidth))
        else:
            self._segment = (int(page.rowsperstrip) or self.shape[0], self.shape[1])
        self._across = math.ceil(self.shape[1] / self._segment[1])
        self._rgba = page.samplesperpixel == 4
        self._decodeargs = {}
        if page.compression in (6, 7, 33007, 34892):  # JPEG: tables live in the page, not in each tile
            self._decodeargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        self._cache: dict[int, np.ndarray | None] = {}

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        seg_h, seg_w = self._segment
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        cols = range(x0 // seg_w, math.ceil(x1 / seg_w))
        tiles: dict[int, np.ndarray | None] = {}
        # One tile row at a time, so the decoded tiles held never exceed one row beyond the output.
        for row in range(y0 // seg_h, math.ceil(y1 / seg_h)):
            wanted = [row * self._across + col for col in cols]
            tiles = {i: self._cache[i] for i in wanted if i in self._cache}
            tiles.update(self._decode([i for i in wanted if i not in tiles]))
            for index, tile in tiles.items():
                self._paste(out, (y0, x0, y1, x1), index, tile)
        self._cache = tiles  # the next band usually starts in this tile row
        return out

    def _paste(self, out: np.ndarray, box: tuple[int, int, int, int], index: int, tile: np.ndarray | None) -> None:
        y0, x0, y1, x1 = box
        seg_h, seg_w = self._segment
        ty, tx = (index // self._across) * seg_h, (index % self._across) * seg_w
        top, left = max(y0, ty), max(x0, tx)
        if tile is None:  # a sparse TIFF's empty tile is background
            out[top - y0 : min(y1, ty + seg_h) - y0, left - x0 : min(x1, tx + seg_w) - x0] = 255
            return
        bottom, right = min(y1, ty + tile.shape[0]), min(x1, tx + tile.shape[1])
        out[top - y0 : bottom - y0, left - x0 : right - x0] = tile[top - ty : bottom - ty, left - tx : right - tx]

    def _decode(self, indices: list[int]) -> dict[int, np.ndarray | None]:
        if not indices:
            return {}
        page = self._page
        segments = list(self._tif.filehandle.read_segments(
            [page.dataoffsets[i] for i in indices], [page.databytecounts[i] for i in indices], indices=indices,
        ))
        if self._executor is not None and len(segments) > 2:
            return dict(self._executor.map(self._decode_one, segments))
        return dict(map(self._decode_one, segments))

    def _decode_one(self, segment: tuple[bytes | None, int]) -> tuple[int, np.ndarray | None]:
        data, index = segment
        if data is None:
            return index, None
        try:
            tile = self._page.decode(data, index, **self._decodeargs)[0]
        except Exception as exc:  # every codec has its own exception types
            raise SlideError(self.slide, f"corrupt or truncated tile {index} of level {self.number} "
                                         f"({type(exc).__name__}: {exc})", _REEXPORT) from exc
        tile = tile[0]  # (depth, rows, cols, samples) -> (rows, cols, samples)
        if self._rgba:
            tile = _drop_opaque_alpha(self.slide, tile)
        return index, tile


@dataclass
class Pyramid:
    """An open slide: its levels, largest first, and what its metadata says about them."""

    path: Path
    format: str  # "svs", "ome-tiff", "tiff", "png" or "jpeg"; "ndpi", "mrxs", "scn", "dicom", ... by other readers
    levels: list[Level]
    base: BaseMagnification
    compression: str
    _closers: list = field(default_factory=list, repr=False)
    reader: str = "tifffile"  # the backend that opened it: tifffile, openslide or dicom (slides/open.py)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    def __enter__(self) -> Pyramid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pyramid(path: str | os.PathLike) -> Pyramid:
    """Open a slide file, checking that it is one distlocal can read; raise SlideError otherwise."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a slide file" if path.is_dir() else "file not found"
        raise SlideError(path, problem, "check the path (manifest paths are relative to the manifest's folder)")
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[:4] in _TIFF_MAGIC:
        return _open_tiff(path)
    for magic, kind in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return _open_image(path, kind)
    raise SlideError(path, "unrecognised file format (not TIFF, SVS, OME-TIFF, PNG or JPEG, nor DICOM, nor one "
                           "OpenSlide recognises: NDPI, SCN, MRXS, Philips TIFF, BIF, VMS)",
                     "convert the slide to a pyramidal TIFF, or export its 5X image as PNG")


def _open_tiff(path: Path) -> Pyramid:
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise SlideError(path, f"corrupt or truncated TIFF ({type(exc).__name__}: {exc})", _REEXPORT) from exc
    executor = ThreadPoolExecutor(DECODE_THREADS) if DECODE_THREADS > 1 else None
    try:
        # The slide is the largest series: SVS and OME files also hold thumbnail, label and macro images.
        series = max(tif.series, key=lambda s: s.levels[0].keyframe.imagelength * s.levels[0].keyframe.imagewidth)
        pages = sorted((level.keyframe for level in series.levels), key=lambda p: -p.imagewidth)
        levels: list[Level] = [TiffLevel(path, tif, page, n, executor) for n, page in enumerate(pages)]
        _check_complete(path, pages)
        base = find_base_magnification(tif)
        kind = "svs" if tif.is_svs else "ome-tiff" if tif.is_ome else "tiff"
        compression = _compression_name(pages[0].compression)
    except Exception as exc:
        tif.close()
        if executor is not None:
            executor.shutdown()
        if isinstance(exc, SlideError):
            raise
        raise SlideError(path, f"corrupt or truncated TIFF ({type(exc).__name__}: {exc})", _REEXPORT) from exc
    closers = [tif.close] + ([executor.shutdown] if executor is not None else [])
    return Pyramid(path, kind, levels, base, compression, closers)


def _open_image(path: Path, kind: str) -> Pyramid:
    try:
        image = imagecodecs.imread(str(path))
    except Exception as exc:
        raise SlideError(path, f"corrupt or truncated {kind.upper()} ({type(exc).__name__}: {exc})",
                         "re-export the image") from exc
    samples = 1 if image.ndim == 2 else image.shape[-1]
    _check_samples(path, samples, image.dtype)
    image = _drop_opaque_alpha(path, image) if samples == 4 else image
    return Pyramid(path, kind, [ArrayLevel(np.ascontiguousarray(image))], BaseMagnification(None, None, "none"), kind)


def _check_samples(path: Path, samples: int, dtype: np.dtype) -> None:
    if samples in (1, 2):
        raise SlideError(path, f"grayscale image ({samples} channel{'s' * (samples == 2)}); distlocal reads RGB "
                               "brightfield (H&E) slides", "convert it to 8-bit RGB before training")
    if samples not in (3, 4):
        raise SlideError(path, f"image with {samples} channels; distlocal reads RGB brightfield (H&E) slides",
                         "export it as 8-bit RGB")
    if dtype != np.uint8:
        raise SlideError(path, f"{np.dtype(dtype).itemsize * 8}-bit samples ({dtype}); distlocal reads 8-bit RGB",
                         "convert it to 8-bit RGB")


def _check_page(path: Path, page: tifffile.TiffPage, number: int) -> None:
    if page.compression != 1 and page.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise SlideError(path, f"unsupported compression {_compression_name(page.compression)} "
                               f"(TIFF code {int(page.compression)}) at level {number} "
                               "(imagecodecs cannot decode it)", "re-save the slide with JPEG, JPEG 2000, LZW, "
                               "Deflate or no compression")
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        raise SlideError(path, "palette (indexed colour) image", "convert it to 8-bit RGB")
    if page.photometric == tifffile.PHOTOMETRIC.SEPARATED:
        raise SlideError(path, "CMYK image", "convert it to 8-bit RGB")
    _check_samples(path, int(page.samplesperpixel), page.dtype if page.dtype is not None else np.dtype("V1"))
    if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.samplesperpixel > 1:
        raise SlideError(path, "colour channels stored as separate planes", "re-save it with contiguous RGB samples")
    if page.is_tiled and page.tiledepth > 1:
        raise SlideError(path, "volumetric (3D) tiles", "export a 2D RGB pyramid")


def _check_complete(path: Path, pages: list[tifffile.TiffPage]) -> None:
    # A download cut short keeps valid IFDs but loses tile data at the end of the file: say so before decoding.
    size = path.stat().st_size
    for number, page in enumerate(pages):
        ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(page.databytecounts, dtype=np.int64)
        if ends.size and int(ends.max()) > size:
            raise SlideError(path, f"truncated file: level {number}'s tiles end at byte {int(ends.max())} but the "
                                   f"file has {size} bytes", _REEXPORT)


def _drop_opaque_alpha(path: Path, image: np.ndarray) -> np.ndarray:
    if not (image[..., 3] == 255).all():
        raise SlideError(path, "RGBA image with transparent pixels; distlocal reads RGB slides and will not guess a "
                               "background", "flatten the image onto white and save it as RGB")
    return image[..., :3]


def _compression_name(value: int) -> str:
    try:
        return tifffile.COMPRESSION(value).name
    except ValueError:
        return "unknown"
