"""
The preparation cache: each slide's 5X tissue crop stored once, so training epochs never re-read the original.

An entry is two files named after the slide id: ``ID.tiff`` (the RGB crop and its tissue mask, tiled, lossless
zstd: decoding it is several times faster than reading and resampling the original pyramid) and ``ID.json``
(what the crop was made from). The JSON is written last, after the TIFF has been renamed into place, so a
preparation killed half-way leaves no entry that looks complete.

An entry is used only when it was made with the same read settings (magnification, level, base magnification,
reader) and, when the original is still reachable, from a file of the same size and modification time. Otherwise the
original is read again: a stale crop is never used silently.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile

from distlocal.slides.errors import SlideError
from distlocal.slides.reader import SlideImage
from distlocal.slides.region import TILE, CachedRegions, OriginalRegions, tile_sums

__all__ = ["CacheKey", "cache_key", "cached_regions", "cached_shape", "entry_paths", "is_cached", "read_cached",
           "write_cached", "write_cached_regions"]

CACHE_VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class CacheKey:
    """What an entry depends on. ``size`` and ``mtime_ns`` are the original's, when it could be seen."""

    source: str
    size: int | None
    mtime_ns: int | None
    magnification: float
    level: int | None
    base_magnification: float | None
    reader: str = "auto"  # data.reader; the reader that read the crop is in the entry's "reader"
    version: int = CACHE_VERSION

    def matches(self, stored: dict) -> bool:
        settings = ("magnification", "level", "base_magnification", "version")
        if any(stored.get(name) != getattr(self, name) for name in settings):
            return False
        if stored.get("reader", "auto") != self.reader:  # entries from before data.reader were read with auto
            return False
        # A cluster node may hold only the cache, not the originals: then the settings alone decide.
        return self.size is None or (stored.get("size"), stored.get("mtime_ns")) == (self.size, self.mtime_ns)


def cache_key(source: str | os.PathLike, magnification: float, level: int | None,
              base_magnification: float | None, reader: str = "auto") -> CacheKey:
    size, mtime = _source_stat(Path(source))
    return CacheKey(str(source), size, mtime, float(magnification), level,
                    None if base_magnification is None else float(base_magnification), reader)


def _source_stat(source: Path) -> tuple[int | None, int | None]:
    # A DICOM slide is a folder, an MRXS slide its .mrxs plus the folder of data files beside it (the .mrxs itself
    # rarely changes): their files' total size and latest change, so a re-downloaded instance or data file counts.
    try:
        files = [f for f in source.iterdir() if f.is_file()] if source.is_dir() else [source]
        data_folder = source.with_suffix("")
        if source.suffix.lower() == ".mrxs" and data_folder.is_dir():
            files += [f for f in data_folder.iterdir() if f.is_file()]
        stats = [f.stat() for f in files]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    except OSError:
        return None, None


def entry_paths(cache_dir: str | os.PathLike, slide_id: str) -> tuple[Path, Path]:
    """(image file, metadata file) of a slide's entry; ids with path-unsafe characters get a hash suffix."""
    name = _SAFE.sub("_", slide_id)
    if name != slide_id or name.startswith("."):
        name = f"{name}-{zlib.crc32(slide_id.encode()):08x}"
    folder = Path(cache_dir)
    return folder / f"{name}.tiff", folder / f"{name}.json"


def _matching_meta(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey) -> dict | None:
    """The entry's metadata when it exists and was made with `key`; an unreadable JSON raises SlideError."""
    meta_path = entry_paths(cache_dir, slide_id)[1]
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise SlideError(meta_path, f"cache entry of slide {slide_id} is unreadable ({exc})",
                         "delete it, or run distlocal prepare again with --force") from None
    return meta if key.matches(meta.get("key", {})) else None


def is_cached(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey) -> bool:
    """Whether a usable entry exists: made with `key`, and its TIFF opens with both pages (no pixel is decoded)."""
    try:
        if _matching_meta(cache_dir, slide_id, key) is None:
            return False
        with tifffile.TiffFile(entry_paths(cache_dir, slide_id)[0]) as tiff:
            return len(tiff.pages) == 2
    except Exception:  # unreadable or damaged: not usable, prepare it again
        return False


def cached_shape(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey) -> tuple[int, int] | None:
    """The (height, width) of the slide's cached crop, from its metadata alone; None when there is no usable entry."""
    meta = _matching_meta(cache_dir, slide_id, key)
    return None if meta is None or "shape" not in meta else tuple(meta["shape"][:2])


def read_cached(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey,
                with_mask: bool = True) -> SlideImage | None:
    """
    The slide's cached crop, or None when there is no entry or it is stale. A damaged entry raises SlideError.

    ``with_mask=False`` leaves the tissue mask unread (``mask`` is an empty array): training needs only the image.
    """
    meta = _matching_meta(cache_dir, slide_id, key)
    if meta is None:
        return None
    image_path = entry_paths(cache_dir, slide_id)[0]
    try:
        with tifffile.TiffFile(image_path) as tiff:
            image = tiff.pages[0].asarray()
            mask = tiff.pages[1].asarray() if with_mask else np.zeros((0, 0), np.uint8)
    except Exception as exc:  # tifffile and imagecodecs raise many types for a damaged file
        raise SlideError(image_path, f"cache entry of slide {slide_id} is damaged ({type(exc).__name__}: {exc})",
                         "delete it, or run distlocal prepare again with --force") from None
    return SlideImage(image, mask.astype(bool), meta["magnification"], meta["source_level"], tuple(meta["bbox"]),
                      meta.get("reader", ""))


def cached_regions(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey) -> CachedRegions | None:
    """The slide's cached crop as a region source (nothing decoded yet), or None when there is no usable entry."""
    meta = _matching_meta(cache_dir, slide_id, key)
    if meta is None:
        return None
    height, width = meta["shape"][:2]
    sums = np.asarray(meta["tile_sums"], dtype=np.int64) if "tile_sums" in meta else None
    return CachedRegions(entry_paths(cache_dir, slide_id)[0], (int(height), int(width)), sums)


def write_cached(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey, slide: SlideImage) -> Path:
    """Store a slide's crop read whole atomically; returns the image file."""
    height = slide.image.shape[0]

    def pages(tiff: tifffile.TiffWriter) -> None:
        tiff.write(slide.image, photometric="rgb", **_PAGE)
        tiff.write(slide.mask.astype(np.uint8), photometric="minisblack", **_PAGE)

    sums = [tile_sums(slide.image[y:y + TILE]) for y in range(0, height, TILE)]
    return _write_entry(cache_dir, slide_id, key, pages, slide.image.shape[:2], slide.magnification,
                        slide.source_level, slide.bbox, slide.reader, sums)


def write_cached_regions(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey,
                         regions: OriginalRegions) -> Path:
    """
    Store a slide's crop atomically, read region by region: one band of TILE rows of the crop and its mask are in
    memory at a time (tifffile writes tiles from an iterator), so a 20X crop is never whole. The pixels are
    read_slide's exactly (slides/region.py says why).
    """
    height, width = regions.shape
    sums: list[np.ndarray] = []  # each image tile's channel sums, filled as the bands go by

    def tiles(read, summed: bool) -> Iterator[np.ndarray]:
        for y0 in range(0, height, TILE):
            band = read(y0, min(y0 + TILE, height), 0, width)
            if summed:
                sums.append(tile_sums(band))
            for x0 in range(0, width, TILE):
                yield band[:, x0:x0 + TILE]

    def pages(tiff: tifffile.TiffWriter) -> None:
        tiff.write(tiles(regions.read, True), shape=(height, width, 3), dtype=np.uint8, photometric="rgb", **_PAGE)
        tiff.write(tiles(lambda *box: regions.mask(*box).astype(np.uint8), False), shape=(height, width),
                   dtype=np.uint8, photometric="minisblack", **_PAGE)

    return _write_entry(cache_dir, slide_id, key, pages, (height, width), regions.plan.magnification,
                        regions.plan.level, regions.box, regions.opened_by, sums)


_PAGE = {"tile": (TILE, TILE), "compression": "zstd", "compressionargs": {"level": 3}, "metadata": None}


def _write_entry(cache_dir: str | os.PathLike, slide_id: str, key: CacheKey, pages, shape: tuple[int, int],
                 magnification: float, source_level: int, bbox, reader: str, sums: list[np.ndarray]) -> Path:
    """
    The TIFF written by ``pages`` under a unique partial name and renamed into place, then the JSON with the tile
    sums ``pages`` left in ``sums`` (a 20X crop of the paper's largest slide: 187 x 81 tiles, ~0.5 MB of JSON).
    """
    image_path, meta_path = entry_paths(cache_dir, slide_id)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer: two nodes sharing the cache folder can run processes of the same pid.
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = image_path.with_suffix(f".tiff.{token}.partial")
    try:
        with tifffile.TiffWriter(partial, bigtiff=shape[0] * shape[1] * 3 > 2**31) as tiff:
            pages(tiff)
    except BaseException:
        partial.unlink(missing_ok=True)  # a read that failed half-way leaves no partial file behind
        raise
    os.replace(partial, image_path)
    meta = {"slide_id": slide_id, "key": asdict(key), "magnification": magnification,
            "source_level": source_level, "bbox": list(bbox), "shape": [*shape, 3], "reader": reader,
            "tile_sums": np.stack(sums).tolist()}
    partial_meta = meta_path.with_suffix(f".json.{token}.partial")
    partial_meta.write_text(json.dumps(meta, indent=1))
    os.replace(partial_meta, meta_path)
    return image_path
