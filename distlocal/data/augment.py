"""
Training augmentation as in the reference, and normalisation.

One slide's augmentation is drawn first (``Augmentation.draw``: edge crop, flips, quarter turns, colour factors),
then applied: to the whole uint8 array (``augment``), or region by region (data/regions.py: a streamed stage 1 reads
its tiles' regions and never holds the slide whole). Both give the same pixels: the geometric steps are a map from
an output region to a source region (``source``) plus a flip / turn of what was read (``orient``), and the colour
jitter is pointwise given one number, the augmented image's mean grey, computed from integer channel sums (exact
whatever order they are summed in). Hue jitter is left out on purpose: on a gigapixel image its HSV round trip
needs several full-size float copies for a change that brightness/contrast/saturation already cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Augmentation", "augment", "colour_jitter", "mean_grey", "normalise", "to_tensor"]

_GREY_WEIGHTS = (0.299, 0.587, 0.114)
_GREY = torch.tensor(_GREY_WEIGHTS)
Box = tuple[int, int, int, int]  # rows y0:y1, columns x0:x1


@dataclass(frozen=True)
class Augmentation:
    """One slide's draws: the crop kept (in the read crop), flips, quarter turns, brightness/contrast/saturation."""

    crop: Box
    flip_cols: bool
    flip_rows: bool
    turns: int  # np.rot90's k: counter-clockwise quarter turns
    brightness: float
    contrast: float
    saturation: float

    @classmethod
    def draw(cls, shape: tuple[int, int], rng: np.random.Generator, crop_p: float = 0.6,
             jitter: float = 0.1) -> Augmentation:
        """The draws for an image of ``shape`` (rows, cols), in the reference's order (the same per-slide RNG)."""
        crop = (0, shape[0], 0, shape[1])
        if rng.random() < crop_p:
            crop = _edge_crop(shape, rng)
        flip_cols, flip_rows = rng.random() < 0.5, rng.random() < 0.5
        turns = int(rng.integers(0, 4))
        b, c, s = (float(rng.uniform(1 - jitter, 1 + jitter)) for _ in range(3))
        return cls(crop, bool(flip_cols), bool(flip_rows), turns, b, c, s)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the augmented image."""
        rows, cols = self.crop[1] - self.crop[0], self.crop[3] - self.crop[2]
        return (cols, rows) if self.turns % 2 else (rows, cols)

    def source(self, y0: int, y1: int, x0: int, x1: int) -> Box:
        """The region of the read crop that the augmented image's region y0:y1, x0:x1 comes from."""
        rows, cols = self.crop[1] - self.crop[0], self.crop[3] - self.crop[2]
        for turn in reversed(range(self.turns)):  # undo each quarter turn: out[i, j] = in[j, w - 1 - i]
            w = cols if turn % 2 == 0 else rows  # the width of the image that turn turned
            y0, y1, x0, x1 = x0, x1, w - y1, w - y0
        if self.flip_rows:
            y0, y1 = rows - y1, rows - y0
        if self.flip_cols:
            x0, x1 = cols - x1, cols - x0
        return y0 + self.crop[0], y1 + self.crop[0], x0 + self.crop[2], x1 + self.crop[2]

    def orient(self, patch: np.ndarray) -> np.ndarray:
        """What was read at ``source(...)`` flipped and turned as the whole image is (views, no copy)."""
        if self.flip_cols:
            patch = patch[:, ::-1]
        if self.flip_rows:
            patch = patch[::-1]
        return np.rot90(patch, k=self.turns)

    def mean_grey(self, sums: np.ndarray) -> float:
        """The augmented image's mean grey (brightness applied) from the crop's int64 channel sums."""
        pixels = (self.crop[1] - self.crop[0]) * (self.crop[3] - self.crop[2])
        return self.brightness * mean_grey(sums, pixels)


def _edge_crop(shape: tuple[int, int], rng: np.random.Generator) -> Box:
    """Keep 50-100 % of each side (90-100 % for sides under 3000 px), at a random offset."""
    out = []
    for side in shape:
        low = 0.9 if side < 3000 else 0.5
        keep = max(1, round(side * rng.uniform(low, 1.0)))
        start = int(rng.integers(0, side - keep + 1))
        out += [start, start + keep]
    return out[0], out[1], out[2], out[3]


def mean_grey(sums: np.ndarray, pixels: int) -> float:
    """The mean grey in [0, 1] of ``pixels`` pixels whose R, G, B sum to ``sums`` (uint8 values)."""
    return float(sum(w * int(s) for w, s in zip(_GREY_WEIGHTS, sums, strict=True)) / (255.0 * pixels))


def augment(image: np.ndarray, rng: np.random.Generator, crop_p: float = 0.6, jitter: float = 0.1) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x H x W in [0, 1], randomly cropped, flipped, rotated and jittered."""
    aug = Augmentation.draw(image.shape[:2], rng, crop_p, jitter)
    y0, y1, x0, x1 = aug.crop
    crop = image[y0:y1, x0:x1]
    mean = aug.mean_grey(crop.sum(axis=(0, 1), dtype=np.int64))
    return colour_jitter(to_tensor(aug.orient(crop)), aug, mean)


def colour_jitter(x: torch.Tensor, aug: Augmentation, mean: float) -> torch.Tensor:
    """
    Brightness, contrast about the image's mean grey ``mean`` (Augmentation.mean_grey), saturation, clamp: in place
    on a float C x H x W (or 1 x C x H x W) image or region in [0, 1]; pointwise, so a region's equal the whole's.
    """
    channel = x.dim() - 3
    weights = _GREY.to(x.device, x.dtype).reshape(3, 1, 1)
    x.mul_(aug.brightness)
    x.sub_(mean).mul_(aug.contrast).add_(mean)
    grey = (x * weights).sum(channel, keepdim=True)
    x.sub_(grey).mul_(aug.saturation).add_(grey)
    return x.clamp_(0, 1)


def to_tensor(image: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x H x W in [0, 1], made on ``device`` (the uint8 crosses: 1/4 of the bytes)."""
    x = torch.from_numpy(np.ascontiguousarray(image))
    return x.to(device or x.device).permute(2, 0, 1).contiguous().float().div_(255)


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (mean, std))
    return x.sub_(mean).div_(std)
