"""
A slide as the network's input read by region (model.stream): what SlideLoader.load gives stage 1 instead of a
decoded tensor, so a 20X slide is never decoded whole and its full-size float input never exists.

``SlideRegions`` is small and picklable (a region source, the slide's augmentation draws, one mean grey): the Ray
loader sends it to stage 1's actor, which reads the regions its stem tiles need (model/tiling.py's RegionInput).
Each region is what the whole input's slice would be, pixel for pixel: augment.py's geometric steps map the region to
the source region it comes from, and its colour jitter is pointwise given the mean grey, which the loader computes
from exact integer channel sums of the crop kept by the edge crop (slides/region.channel_sums): from a cache entry,
its tiles' sums stored by prepare plus the border tiles decoded; from an original, the same table made in one
band-by-band pass the first time the process loads it, and kept (data/original_sums.py). Stage 1
then holds only its stem map in host memory (model/stage.py run_stem says how much).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distlocal.data.augment import Augmentation, colour_jitter, normalise, to_tensor
from distlocal.slides.region import RegionSource

__all__ = ["SlideRegions"]


@dataclass
class SlideRegions:
    """A slide's normalised (augmented when training) 1 x 3 x H x W input, read region by region."""

    source: RegionSource  # the uint8 tissue crop: a cache entry or the original
    augmentation: Augmentation | None  # None: evaluation, or data.augment off
    grey: float  # the augmented image's mean grey (contrast jitter); 0 without augmentation
    mean: list[float]  # data.mean, data.std: the normalisation
    std: list[float]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        rows, cols = self.augmentation.shape if self.augmentation else self.source.shape
        return 1, 3, rows, cols

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """The input's rows y0:y1, columns x0:x1 as a 1 x 3 x h x w float32 tensor in host memory."""
        aug = self.augmentation
        if aug is None:
            return normalise(to_tensor(self.source.read(y0, y1, x0, x1)), self.mean, self.std)[None]
        patch = aug.orient(self.source.read(*aug.source(y0, y1, x0, x1)))
        return normalise(colour_jitter(to_tensor(patch), aug, self.grey), self.mean, self.std)[None]

    def close(self) -> None:
        """Close the slide file the reads opened (it opens again on the next read)."""
        self.source.close()
