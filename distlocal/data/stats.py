"""
A cohort's per-channel mean and standard deviation over tissue pixels: the normalisation data.mean / data.std.

Only tissue counts (the reader's tissue mask): the glass or dark background around it would pull the numbers
towards white (H&E) or black (immunofluorescence) by however much of each slide it covers. Sums are integers over
every tissue pixel of every slide, read band by band (a 20X crop is never decoded whole), so the result does not
depend on the order or on slide sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import yaml

from distlocal.config import DataConfig
from distlocal.data.loader import entry_key, named_slide_error, original_regions
from distlocal.data.manifest import ManifestError, SlideRecord
from distlocal.progress import progress
from distlocal.slides import SlideError
from distlocal.slides.cache import cached_regions
from distlocal.slides.region import bands

__all__ = ["ChannelStats", "channel_stats"]


@dataclass(frozen=True)
class ChannelStats:
    mean: list[float]  # RGB, of pixel values scaled to 0..1 (as data.mean)
    std: list[float]
    pixels: int  # tissue pixels counted
    slides: int
    skipped: list[str]  # slide ids that could not be read

    def as_yaml(self) -> str:
        """A config fragment: the data section's mean and std."""
        return yaml.safe_dump({"data": {"mean": self.mean, "std": self.std}}, default_flow_style=None)

    def overrides(self) -> str:
        """The same as --set arguments."""
        return f"--set data.mean=[{','.join(map(str, self.mean))}] --set data.std=[{','.join(map(str, self.std))}]"


def _tissue_sums(record: SlideRecord, cfg: DataConfig) -> tuple[int, np.ndarray, np.ndarray]:
    """
    (tissue pixels, int64 R, G, B sums, int64 sums of squares) of the slide's crop, from data.cache_dir when prepared
    there, else from the original; read band by band, so a 20X crop is never decoded whole.
    """
    source = cached_regions(cfg.cache_dir, record.slide_id, entry_key(record, cfg)) if cfg.cache_dir else None
    source = source or original_regions(record, cfg)
    count, sums, squares = 0, np.zeros(3, np.int64), np.zeros(3, np.int64)
    height, width = source.shape
    try:
        with named_slide_error(record):
            for y0, y1 in bands(height, width):
                # uint16 holds a square (255^2 = 65025): two copies of the band's tissue, not 8-byte ones
                pixels = source.read(y0, y1, 0, width)[source.mask(y0, y1, 0, width)].astype(np.uint16)
                count += len(pixels)
                sums += pixels.sum(0, dtype=np.int64)
                squares += (pixels * pixels).sum(0, dtype=np.int64)  # int64 holds 10^14 pixels' worth
    finally:
        source.close()
    return count, sums, squares


def channel_stats(records: list[SlideRecord], cfg: DataConfig) -> ChannelStats:
    """Mean and std of each channel over the tissue pixels of ``records`` (data.on_error decides on bad slides)."""
    total, sums, squares, skipped = 0, np.zeros(3, np.int64), np.zeros(3, np.int64), []
    for record in progress(records, desc="stats", unit="slide"):
        try:
            count, slide_sums, slide_squares = _tissue_sums(record, cfg)
        except SlideError:
            if cfg.on_error == "fail":
                raise
            skipped.append(record.slide_id)
            continue
        total, sums, squares = total + count, sums + slide_sums, squares + slide_squares
    if total == 0:
        raise ManifestError(f"no tissue pixels in the {len(records)} slide(s) given ({len(skipped)} unreadable): "
                            f"nothing to compute a mean / std from; check the manifest's paths and split column")
    # Integer sums are exact in any order, and so is N * sum(x^2) - sum(x)^2 in Python's integers (no cancellation);
    # values scaled to 0..1 as data.mean is
    mean = [int(s) / (255 * total) for s in sums]
    std = [math.sqrt(total * int(q) - int(s) ** 2) / (255 * total) for s, q in zip(sums, squares, strict=True)]
    return ChannelStats([round(m, 4) for m in mean], [round(s, 4) for s in std], total,
                        len(records) - len(skipped), skipped)
