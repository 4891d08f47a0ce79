"""
A cohort's per-channel mean and standard deviation over tissue pixels: the normalisation data.mean / data.std.

Only tissue counts (the reader's tissue mask): the glass or dark background around it would pull the numbers
towards white (H&E) or black (immunofluorescence) by however much of each slide it covers. Sums are in float64
over every tissue pixel of every slide, so the result does not depend on the order or on slide sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import yaml

from distlocal.config import DataConfig
from distlocal.data.loader import read_original
from distlocal.data.manifest import ManifestError, SlideRecord
from distlocal.progress import progress
from distlocal.slides import SlideError
from distlocal.slides.cache import cache_key, read_cached

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


def _tissue_pixels(record: SlideRecord, cfg: DataConfig) -> np.ndarray:
    """The slide's tissue pixels, N x 3 uint8: from data.cache_dir when prepared there, else from the original."""
    slide = None
    if cfg.cache_dir:
        key = cache_key(record.path, cfg.magnification, cfg.level, cfg.base_magnification)
        slide = read_cached(cfg.cache_dir, record.slide_id, key, with_mask=True)
    slide = slide or read_original(record, cfg)
    return slide.image[slide.mask]


def channel_stats(records: list[SlideRecord], cfg: DataConfig) -> ChannelStats:
    """Mean and std of each channel over the tissue pixels of ``records`` (data.on_error decides on bad slides)."""
    total, sums, squares, skipped = 0, np.zeros(3), np.zeros(3), []
    for record in progress(records, desc="stats", unit="slide"):
        try:
            pixels = _tissue_pixels(record, cfg).astype(np.float64) / 255
        except SlideError:
            if cfg.on_error == "fail":
                raise
            skipped.append(record.slide_id)
            continue
        total += len(pixels)
        sums += pixels.sum(0)
        squares += (pixels * pixels).sum(0)
    if total == 0:
        raise ManifestError(f"no tissue pixels in the {len(records)} slide(s) given ({len(skipped)} unreadable): "
                            f"nothing to compute a mean / std from; check the manifest's paths and split column")
    mean = sums / total
    std = np.sqrt(np.maximum(squares / total - mean * mean, 0))
    return ChannelStats([round(float(m), 4) for m in mean], [round(float(s), 4) for s in std], total,
                        len(records) - len(skipped), skipped)
