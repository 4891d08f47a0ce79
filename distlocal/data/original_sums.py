"""
The tile sums of original slides, kept per process, so that training streamed from originals decodes each crop once
per epoch after the first.

With model.stream on, the contrast jitter's mean grey is computed in the loader from integer channel sums of the crop
the augmentation keeps (data/regions.py), and stage 1 then decodes the regions it reads. A prepared cache entry
stores each 512-px tile's sums, so the loader decodes only a frame of border tiles; an original has no such table,
and a band-by-band pass over the whole crop would run every epoch beside stage 1's own decoding. The first time a
process loads an original it computes the same table in that one pass (slides/region.crop_tile_sums) and keeps it
here under the slide's cache key (its path, size, mtime and read settings: a changed file is a new key). Tables are
small (24 bytes per 512 x 512 tile: 24 KB for the paper's largest slide at 5X, 390 KB at 20X); the oldest are
dropped past TABLE_BYTES. Sums are integers, so the mean grey from a table is the one a full pass gives, bit for bit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from distlocal.slides.cache import CacheKey
from distlocal.slides.region import OriginalRegions, crop_tile_sums

__all__ = ["TABLE_BYTES", "with_tile_sums"]

TABLE_BYTES = 256 * 2**20  # the tables one process keeps, at most: thousands of slides at 5X

_tables: OrderedDict[CacheKey, np.ndarray] = OrderedDict()
_held = 0  # their bytes
_lock = threading.Lock()  # the loader's prefetch threads share the tables


def with_tile_sums(source: OriginalRegions, key: CacheKey) -> OriginalRegions:
    """``source`` with its crop's tile sums: kept from an earlier load of the same key, else computed and kept."""
    with _lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
    if table is None:
        table = crop_tile_sums(source)  # (two threads loading one slide at once may both make it: the same table)
        with _lock:
            global _held
            if key not in _tables:
                _tables[key] = table
                _held += table.nbytes
            while _held > TABLE_BYTES and len(_tables) > 1:
                _held -= _tables.popitem(last=False)[1].nbytes
    source.tile_sums = table
    return source
