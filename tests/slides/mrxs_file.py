"""
A 3DHISTECH MIRAX (MRXS) slide, written as OpenSlide 4.0.1's reader (src/openslide-vendor-mirax.c) reads it:

- ``slide.mrxs`` beside a folder ``slide/`` holding ``Slidedat.ini``, ``Index.dat`` and ``Data0000.dat``.
- Slidedat.ini: [GENERAL] SLIDE_ID, IMAGENUMBER_X / _Y (level 0 camera images across and down) and
  OBJECTIVE_MAGNIFICATION; [HIERARCHICAL] HIER_0 named "Slide zoom level" with one section per zoom level, and
  INDEXFILE; [DATAFILE] FILE_COUNT, FILE_0; per level: IMAGE_CONCAT_FACTOR (0 at level 0, then the power of two
  each level adds), OVERLAP_X / _Y, MICROMETER_PER_PIXEL_X / _Y, IMAGE_FORMAT, IMAGE_FILL_COLOR_BGR and
  DIGITIZER_WIDTH / _HEIGHT (every level's JPEGs are that size: a level-n image holds 2^n x 2^n level 0 images).
- Index.dat (little-endian int32): "01.02" + the slide id, then the hierarchical root (a pointer to one pointer
  per zoom level) and the non-hierarchical root. Each zoom level's pointer leads to ``0, first page``; a page is
  ``record count, next page (0: last)`` and records of ``image index, offset, length, file number``, the index
  being ``y * IMAGENUMBER_X + x`` of the image's top-left level 0 image.
- Without a camera position buffer (NONHIER_COUNT=0) and with no overlap, OpenSlide places image (x, y) at
  ``x * DIGITIZER_WIDTH`` on the grid, and each level's image at its level 0 position divided by 2^n.

As a scanner does, camera fields that hold only glass are not stored at level 0: OpenSlide leaves them
transparent there. Levels above 0 are stored whole.
"""

from __future__ import annotations

import struct
from pathlib import Path

import imagecodecs
import numpy as np

SLIDE_ID = "8b1a5f3c2d4e4f60a7b8c9d0e1f20314"
INDEX_VERSION = b"01.02"
JPEG_QUALITY = 95


def _int32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def _slidedat(levels: list[np.ndarray], image_side: int, objective: float, mpp: float) -> str:
    images_down, images_across = (side // image_side for side in levels[0].shape[:2])
    lines = ["[GENERAL]", "SLIDE_VERSION=01.03", f"SLIDE_ID={SLIDE_ID}", f"IMAGENUMBER_X={images_across}",
             f"IMAGENUMBER_Y={images_down}", f"OBJECTIVE_MAGNIFICATION={objective:g}",
             "CameraImageDivisionsPerSide=1", "", "[HIERARCHICAL]", "HIER_COUNT=1", "HIER_0_NAME=Slide zoom level",
             f"HIER_0_COUNT={len(levels)}"]
    for n in range(len(levels)):
        lines += [f"HIER_0_VAL_{n}=ZoomLevel_{n}", f"HIER_0_VAL_{n}_SECTION=LAYER_0_LEVEL_{n}_SECTION"]
    lines += ["NONHIER_COUNT=0", "INDEXFILE=Index.dat", "", "[DATAFILE]", "FILE_COUNT=1", "FILE_0=Data0000.dat", ""]
    for n in range(len(levels)):
        lines += [f"[LAYER_0_LEVEL_{n}_SECTION]", "OVERLAP_X=0", "OVERLAP_Y=0",
                  f"MICROMETER_PER_PIXEL_X={mpp * 2 ** n:g}", f"MICROMETER_PER_PIXEL_Y={mpp * 2 ** n:g}",
                  "IMAGE_FORMAT=JPEG", "IMAGE_FILL_COLOR_BGR=16777215", f"DIGITIZER_WIDTH={image_side}",
                  f"DIGITIZER_HEIGHT={image_side}", f"IMAGE_CONCAT_FACTOR={0 if n == 0 else 1}", ""]
    return "\r\n".join(lines)  # the scanner writes Windows line ends


def _images(levels: list[np.ndarray], image_side: int, glass: tuple[int, int, int]) -> list[list[tuple[int, bytes]]]:
    # Per level: (image index, JPEG) of each stored image, the index counted in level 0 images.
    across = levels[0].shape[1] // image_side
    stored = []
    for n, level in enumerate(levels):
        step = 2 ** n
        images = []
        for y in range(0, level.shape[0], image_side):
            for x in range(0, level.shape[1], image_side):
                tile = level[y : y + image_side, x : x + image_side]
                if n == 0 and (tile == glass).all():
                    continue  # an empty camera field: not scanned
                index = (y // image_side) * step * across + (x // image_side) * step
                images.append((index, imagecodecs.jpeg8_encode(tile, level=JPEG_QUALITY)))
        stored.append(images)
    return stored


def _index(stored: list[list[tuple[int, bytes]]], offsets: list[list[int]], page_size: int) -> bytes:
    header = INDEX_VERSION + SLIDE_ID.encode()
    hier_table = len(header) + 8  # after the hierarchical and non-hierarchical roots
    nonhier_table = hier_table + 4 * len(stored)
    out = bytearray(header + _int32(hier_table, nonhier_table))
    out += bytes(4 * len(stored))  # the per-level pointers, filled in below
    out += _int32(0)  # the non-hierarchical table: no records (NONHIER_COUNT=0)
    for n, images in enumerate(stored):
        out[hier_table + 4 * n : hier_table + 4 * n + 4] = _int32(len(out))
        first_page = len(out) + 8
        out += _int32(0, first_page)
        records = [(index, offset, len(jpeg), 0) for (index, jpeg), offset in zip(images, offsets[n], strict=True)]
        pages = [records[i : i + page_size] for i in range(0, len(records), page_size)]
        for p, page in enumerate(pages):  # a linked list of data pages
            next_page = len(out) + 8 + 16 * len(page) if p + 1 < len(pages) else 0
            out += _int32(len(page), next_page)
            for record in page:
                out += _int32(*record)
    return bytes(out)


def write_mrxs(path: Path, levels: list[np.ndarray], objective: float = 20.0, mpp: float = 0.5,
               image_side: int = 64, glass: tuple[int, int, int] = (244, 244, 244), page_size: int = 5) -> Path:
    """
    Write ``path`` (``.mrxs``) and its data folder. ``levels`` halve in size from one to the next and their sides
    are multiples of ``image_side`` x 2^level; level 0 images that are all ``glass`` are left out.
    """
    folder = path.with_suffix("")
    folder.mkdir()
    stored = _images(levels, image_side, glass)
    data, offsets = bytearray(), []
    for images in stored:  # level 0 first, the smallest level last
        offsets.append([])
        for _, jpeg in images:
            offsets[-1].append(len(data))
            data += jpeg
    (folder / "Data0000.dat").write_bytes(bytes(data))
    (folder / "Index.dat").write_bytes(_index(stored, offsets, page_size))
    (folder / "Slidedat.ini").write_bytes(b"\xef\xbb\xbf" + _slidedat(levels, image_side, objective, mpp).encode())
    path.write_bytes(b"")  # OpenSlide reads nothing from the .mrxs itself: it only needs it to exist
    return path
