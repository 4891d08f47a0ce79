"""
A 3DHISTECH MIRAX (MRXS) slide, written as OpenSlide 4.0.1's reader (src/openslide-vendor-mirax.c) and the
openslide.org MIRAX format page describe it:

- ``slide.mrxs`` beside a folder ``slide/`` holding ``Slidedat.ini``, ``Index.dat`` and ``Data0000.dat``.
- Slidedat.ini, the keys OpenSlide requires: [GENERAL] SLIDE_ID, IMAGENUMBER_X / _Y (level 0 images across and
  down); [HIERARCHICAL] HIER_COUNT, HIER_0_NAME "Slide zoom level" with HIER_0_COUNT sections (one per zoom
  level), NONHIER_COUNT and INDEXFILE; [DATAFILE] FILE_COUNT, FILE_0; per level: IMAGE_CONCAT_FACTOR (0 at level
  0, then the power of two each level adds), OVERLAP_X / _Y, MICROMETER_PER_PIXEL_X / _Y (level 0's is
  openslide.mpp-x), IMAGE_FORMAT, IMAGE_FILL_COLOR_BGR, DIGITIZER_WIDTH / _HEIGHT (every level's JPEGs are that
  size: a level-n image holds 2^n x 2^n level 0 images, downsampled). Optional: OBJECTIVE_MAGNIFICATION
  (openslide.objective-power) and CameraImageDivisionsPerSide (each camera photo is split into that many images
  a side; 1 when absent).
- Index.dat (little-endian int32): "01.02" + the slide id, then pointers to the hierarchical and the
  non-hierarchical tables (one pointer per VAL). Each points to a linked list of data pages, ``item count, next
  page (0: last)`` then the items; the first page has no items. A zoom level's items are ``image index, offset,
  length, file number``, the index being ``y * IMAGENUMBER_X + x`` of the image's top-left level 0 image; a
  non-hierarchical item is ``0, 0, offset, length, file number``.
- ``stitched``: the camera position of each photo, as version 2.2 scanners store it, in the StitchingIntensityLayer
  record: zlib-compressed 9-byte records (flag, x, y in level 0 pixels), flag 0 and (0, 0) for a photo not taken.
  OpenSlide then places each photo at its position and shows at every level only what the photos taken cover.
  Without it, photo (x, y) sits at ``x * photo side`` (no overlap written here in either case).

As a scanner does, photos of glass alone are not taken: their images are not stored at level 0, nor the images
of higher levels that hold no photo taken.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np

SLIDE_ID = "8b1a5f3c2d4e4f60a7b8c9d0e1f20314"
INDEX_VERSION = b"01.02"
JPEG_QUALITY = 95


def _int32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def _slidedat(levels: list[np.ndarray], image_side: int, divisions: int, objective: float | None, mpp: float,
              stitched: bool) -> str:
    images_down, images_across = (side // image_side for side in levels[0].shape[:2])
    lines = ["[GENERAL]", "SLIDE_VERSION=01.03", f"SLIDE_ID={SLIDE_ID}", f"IMAGENUMBER_X={images_across}",
             f"IMAGENUMBER_Y={images_down}",
             *([f"OBJECTIVE_MAGNIFICATION={objective:g}"] if objective is not None else []),
             f"CameraImageDivisionsPerSide={divisions}", "", "[HIERARCHICAL]", "HIER_COUNT=1",
             "HIER_0_NAME=Slide zoom level", f"HIER_0_COUNT={len(levels)}"]
    for n in range(len(levels)):
        lines += [f"HIER_0_VAL_{n}=ZoomLevel_{n}", f"HIER_0_VAL_{n}_SECTION=LAYER_0_LEVEL_{n}_SECTION"]
    lines += [f"NONHIER_COUNT={int(stitched)}"]
    if stitched:
        lines += ["NONHIER_0_NAME=StitchingIntensityLayer", "NONHIER_0_COUNT=1",
                  "NONHIER_0_VAL_0=StitchingIntensityLevel"]
    lines += ["INDEXFILE=Index.dat", "", "[DATAFILE]", "FILE_COUNT=1", "FILE_0=Data0000.dat", ""]
    for n in range(len(levels)):
        lines += [f"[LAYER_0_LEVEL_{n}_SECTION]", "OVERLAP_X=0", "OVERLAP_Y=0",
                  f"MICROMETER_PER_PIXEL_X={mpp * 2 ** n:g}", f"MICROMETER_PER_PIXEL_Y={mpp * 2 ** n:g}",
                  "IMAGE_FORMAT=JPEG", "IMAGE_FILL_COLOR_BGR=16777215", f"DIGITIZER_WIDTH={image_side}",
                  f"DIGITIZER_HEIGHT={image_side}", f"IMAGE_CONCAT_FACTOR={0 if n == 0 else 1}", ""]
    return "\r\n".join(lines)  # the scanner writes Windows line ends


def _photos_taken(level0: np.ndarray, photo_side: int, glass: tuple[int, int, int]) -> np.ndarray:
    down, across = level0.shape[0] // photo_side, level0.shape[1] // photo_side
    photos = level0[: down * photo_side, : across * photo_side].reshape(down, photo_side, across, photo_side, 3)
    return ~(photos == np.array(glass, np.uint8)).all(axis=(1, 3, 4))


def _images(levels: list[np.ndarray], image_side: int, divisions: int,
            taken: np.ndarray) -> list[list[tuple[int, bytes]]]:
    # Per level: (image index, JPEG) of each stored image, the index counted in level 0 images.
    across = levels[0].shape[1] // image_side
    stored = []
    for n, level in enumerate(levels):
        step = 2 ** n
        images = []
        for y in range(0, level.shape[0], image_side):
            for x in range(0, level.shape[1], image_side):
                x0, y0 = x // image_side * step, y // image_side * step  # in level 0 images
                photos = taken[y0 // divisions : (y0 + step - 1) // divisions + 1,
                               x0 // divisions : (x0 + step - 1) // divisions + 1]
                if photos.any():
                    jpeg = imagecodecs.jpeg8_encode(level[y : y + image_side, x : x + image_side], level=JPEG_QUALITY)
                    images.append((y0 * across + x0, jpeg))
        stored.append(images)
    return stored


def _positions(taken: np.ndarray, photo_side: int) -> bytes:
    records = b"".join(struct.pack("<Bii", 1, x * photo_side, y * photo_side) if taken[y, x]
                       else struct.pack("<Bii", 0, 0, 0) for y in range(taken.shape[0]) for x in range(taken.shape[1]))
    return zlib.compress(records)


def _index(stored: list[list[tuple[int, bytes]]], offsets: list[list[int]], nonhier: list[tuple[int, int]],
           page_size: int) -> bytes:
    header = INDEX_VERSION + SLIDE_ID.encode()
    hier_table = len(header) + 8  # after the two root pointers
    nonhier_table = hier_table + 4 * len(stored)
    out = bytearray(header + _int32(hier_table, nonhier_table) + bytes(4 * (len(stored) + len(nonhier))))

    def add_list(table_entry: int, pages: list[list[tuple[int, ...]]]) -> None:
        out[table_entry : table_entry + 4] = _int32(len(out))
        out.extend(_int32(0, len(out) + 8))  # the first page: no items, then the next page
        for p, page in enumerate(pages):
            next_page = len(out) + 8 + 4 * sum(len(item) for item in page) if p + 1 < len(pages) else 0
            out.extend(_int32(len(page), next_page))
            for item in page:
                out.extend(_int32(*item))

    for n, images in enumerate(stored):
        items = [(index, offset, len(jpeg), 0) for (index, jpeg), offset in zip(images, offsets[n], strict=True)]
        add_list(hier_table + 4 * n, [items[i : i + page_size] for i in range(0, len(items), page_size)])
    for r, (offset, length) in enumerate(nonhier):
        add_list(nonhier_table + 4 * r, [[(0, 0, offset, length, 0)]])
    return bytes(out)


def write_mrxs(path: Path, levels: list[np.ndarray], objective: float | None = 20.0, mpp: float = 0.5,
               image_side: int = 64, divisions: int = 1, stitched: bool = False,
               glass: tuple[int, int, int] = (244, 244, 244), page_size: int = 5) -> Path:
    """
    Write ``path`` (``.mrxs``) and its data folder. ``levels`` halve in size from one to the next, their sides
    multiples of ``image_side`` x 2^level; a camera photo is ``divisions`` images a side, and photos that are all
    ``glass`` are not taken. ``objective`` None leaves OBJECTIVE_MAGNIFICATION out.
    """
    folder = path.with_suffix("")
    folder.mkdir()
    taken = _photos_taken(levels[0], image_side * divisions, glass)
    stored = _images(levels, image_side, divisions, taken)
    data, offsets = bytearray(), []
    for images in stored:  # level 0 first, the smallest level last
        offsets.append([])
        for _, jpeg in images:
            offsets[-1].append(len(data))
            data += jpeg
    nonhier = []
    if stitched:
        positions = _positions(taken, image_side * divisions)
        nonhier.append((len(data), len(positions)))
        data += positions
    (folder / "Data0000.dat").write_bytes(bytes(data))
    (folder / "Index.dat").write_bytes(_index(stored, offsets, nonhier, page_size))
    slidedat = _slidedat(levels, image_side, divisions, objective, mpp, stitched)
    (folder / "Slidedat.ini").write_bytes(b"\xef\xbb\xbf" + slidedat.encode())
    path.write_bytes(b"")  # OpenSlide reads nothing from the .mrxs itself: it only needs it to exist
    return path
