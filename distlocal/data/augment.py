"""
Training augmentation as in the reference, and normalisation.

Geometric steps work on the uint8 array (cheap views); colour jitter is a few blends on the float
tensor. Hue jitter is left out on purpose: on a gigapixel image its HSV round trip needs several
full-size float copies for a change that brightness/contrast/saturation already cover.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["augment", "normalise"]

_GREY = torch.tensor([0.299, 0.587, 0.114])


def _edge_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep 50-100 % of each side (90-100 % for sides under 3000 px), at a random offset."""
    out = []
    for side in image.shape[:2]:
        low = 0.9 if side < 3000 else 0.5
        keep = max(1, round(side * rng.uniform(low, 1.0)))
        start = int(rng.integers(0, side - keep + 1))
        out.append(slice(start, start + keep))
    return image[out[0], out[1]]


def augment(image: np.ndarray, rng: np.random.Generator, crop_p: float = 0.6, jitter: float = 0.1) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x H x W in [0, 1], randomly cropped, flipped, rotated and jittered."""
    if rng.random() < crop_p:
        image = _edge_crop(image, rng)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    image = np.rot90(image, k=int(rng.integers(0, 4)))
    x = to_tensor(image)
    b, c, s = (rng.uniform(1 - jitter, 1 + jitter) for _ in range(3))
    x.mul_(b)
    mean = (x * _GREY[:, None, None]).sum(0).mean()
    x.sub_(mean).mul_(c).add_(mean)
    grey = (x * _GREY[:, None, None]).sum(0, keepdim=True)
    x.sub_(grey).mul_(s).add_(grey)
    return x.clamp_(0, 1)


def to_tensor(image: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x H x W in [0, 1], made on ``device`` (the uint8 crosses: 1/4 of the bytes)."""
    x = torch.from_numpy(np.ascontiguousarray(image))
    return x.to(device or x.device).permute(2, 0, 1).contiguous().float().div_(255)


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (mean, std))
    return x.sub_(mean).div_(std)
