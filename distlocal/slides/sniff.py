"""
What a slide file is, from its first bytes, without importing any reader: `slides/open.py` picks the reader by it,
and only the reader a slide needs is imported (wsidicom's import alone takes seconds).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TIFF_MAGIC", "is_dicom_file", "is_tiff_file"]

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def _head(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: the 128-byte preamble, then ``DICM``."""
    return _head(path, 132)[128:] == b"DICM"


def is_tiff_file(path: Path) -> bool:
    """A TIFF or BigTIFF file (SVS, NDPI, SCN, Philips TIFF and BIF are all TIFF)."""
    return _head(path, 4) in TIFF_MAGIC
