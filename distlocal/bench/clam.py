"""
The patch pipeline users run instead of distlocal, from the slide file: CLAM's ``create_patches_fp`` and
``extract_features_fp``, then GABMIL, with every tile read through OpenSlide.

What CLAM does, step by step, and what is kept here:
- tiling: the whole segmentation level (the one best for a 64x downsample) is read with ``read_region`` and
  thresholded on HSV saturation (distlocal's Otsu mask stands in for CLAM's OpenCV median blur, threshold and
  contours); the 224 px grid at 5X covers the tissue's bounding box, and a tile is kept when one of the four
  points half-way between its centre and its corners is tissue (CLAM's ``four_pt`` contour check);
- features: a torch ``DataLoader`` over the tile coordinates; each worker opens the slide with OpenSlide and, per
  tile, ``read_region`` at the level nearest 5X (at or above it), a resize to 224 px when that level is not
  exactly 5X (PIL's default filter, as CLAM's ``img.resize``), then ``ToTensor`` and ``Normalize``; batches go
  to the ResNet (``PatchMIL.features``) on the device;
- prediction: GABMIL over the tile features.
CLAM also writes the coordinates and the features to HDF5 files between the steps; that disk traffic is left
out, which only flatters the baseline.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distlocal.bench.patch_mil import PATCH, PatchMIL
from distlocal.model.stage import autocast
from distlocal.predictor import elapsed
from distlocal.slides import SlideError
from distlocal.slides.magnification import magnification_from_mpp
from distlocal.slides.tissue import detect_tissue

__all__ = ["TilePlan", "clam_pipeline", "default_workers", "open_slide", "plan_tiles"]

SEG_DOWNSAMPLE = 64  # CLAM's seg_level=-1: the level best for a 64x downsample
_INSTALL = ("install OpenSlide's Python packages: `uv sync` (the dev group) or `pip install openslide-python "
            "openslide-bin`")


def open_slide(path: str | os.PathLike):
    """An ``openslide.OpenSlide``; a clear error when OpenSlide is missing or cannot read the file."""
    try:
        import openslide
    except ImportError as exc:  # a dev dependency: a plain `pip install distlocal` has no OpenSlide
        raise SlideError(path, "the patch baseline reads tiles through OpenSlide, which is not installed",
                         _INSTALL) from exc
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise SlideError(path, f"OpenSlide cannot read it ({exc})", "give a slide OpenSlide reads (SVS, pyramidal "
                                                                    "TIFF), or use --mode memory") from exc


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles are: ``coords`` N x 2 (x, y) in level-0 pixels, each read as ``read_size`` px at ``level``."""

    coords: np.ndarray
    level: int
    read_size: int
    grid_tiles: int  # tiles of the grid over the tissue's bounding box, kept or not


def plan_tiles(slide, path: str | os.PathLike, magnification: float = 5.0, patch: int = PATCH) -> TilePlan:
    """CLAM's patching of one open slide: tissue on the segmentation level, then the tiles of the 5X grid."""
    props = slide.properties
    power, mpp = props.get("openslide.objective-power"), props.get("openslide.mpp-x")
    if power:
        base = float(power)
    elif mpp:
        base = magnification_from_mpp(float(mpp))
    else:
        raise SlideError(path, "OpenSlide finds neither objective-power nor MPP in the slide's metadata",
                         "give a slide with its magnification, or use --mode memory with data.base_magnification")
    downsample = base / magnification  # level-0 pixels per 5X pixel
    level = slide.get_best_level_for_downsample(downsample * 1.01)  # a 4.999X level counts as 5X
    read_size = max(1, round(patch * downsample / slide.level_downsamples[level]))
    seg_level = slide.get_best_level_for_downsample(SEG_DOWNSAMPLE)
    width, height = slide.level_dimensions[seg_level]
    mask = detect_tissue(np.asarray(slide.read_region((0, 0), seg_level, (width, height)).convert("RGB"))).mask
    if not mask.any():
        raise SlideError(path, "no tissue found on the segmentation level", "check that it is an H&E scan")
    full_w, full_h = slide.dimensions
    scale_y, scale_x = height / full_h, width / full_w  # level-0 pixels to mask pixels
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, x0 = rows[0] / scale_y, cols[0] / scale_x
    step = patch * downsample
    ys = y0 + step * np.arange(math.ceil((rows[-1] + 1) / scale_y - y0) // step + 1)
    xs = x0 + step * np.arange(math.ceil((cols[-1] + 1) / scale_x - x0) // step + 1)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    keep = np.zeros(len(grid), bool)
    for dy, dx in ((0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):  # four_pt: centre +- a quarter tile
        my = np.minimum(((grid[:, 0] + dy * step) * scale_y).astype(int), height - 1)
        mx = np.minimum(((grid[:, 1] + dx * step) * scale_x).astype(int), width - 1)
        keep |= mask[my, mx]
    coords = np.round(grid[keep][:, ::-1]).astype(np.int64)  # (x, y): OpenSlide's order
    return TilePlan(coords, level, read_size, len(grid))


class _TileBag(torch.utils.data.Dataset):
    """CLAM's ``Whole_Slide_Bag_FP``: one normalised 3 x 224 x 224 tile per coordinate, read through OpenSlide."""

    def __init__(self, path: Path, plan: TilePlan, mean: list[float], std: list[float]):
        from torchvision import transforms

        self.path, self.plan, self.slide = path, plan, None
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.plan.coords)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.slide is None:  # one OpenSlide handle per worker process, opened there
            self.slide = open_slide(self.path)
        x, y = self.plan.coords[index]
        size = self.plan.read_size
        tile = self.slide.read_region((int(x), int(y)), self.plan.level, (size, size)).convert("RGB")
        if size != PATCH:
            tile = tile.resize((PATCH, PATCH))
        return self.transform(tile)


def default_workers(device: torch.device) -> int:
    """CLAM's 8 loader workers on CUDA (fewer on a smaller machine); 1 on a CPU, whose cores run the ResNet."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 1


@torch.no_grad()
def clam_pipeline(baseline: PatchMIL, path: str | os.PathLike, workers: int, mean: list[float],
                  std: list[float]) -> dict:
    """Classify one slide file as CLAM + GABMIL do, timing Table 3's steps (seconds, the device synchronised)."""
    device = baseline.device
    start = time.perf_counter()
    with open_slide(path) as slide:
        plan = plan_tiles(slide, path)
    tiling_s = time.perf_counter() - start
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(_TileBag(Path(path), plan, mean, std), batch_size=baseline.batch,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    features, wait_s, batches = [], 0.0, iter(loader)
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)  # the time the ResNet waits for tiles: reading is not hidden behind compute
        wait_s += time.perf_counter() - waited
        if batch is None:
            break
        x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, baseline.bf16):
            features.append(baseline.features(x).float())
    features = torch.cat(features)
    features_s = elapsed(start, device)
    start = time.perf_counter()
    probs, _ = baseline.classify(features)
    prediction_s = elapsed(start, device)
    return {"tiling_s": tiling_s, "features_s": features_s, "wait_s": wait_s, "prediction_s": prediction_s,
            "total_s": tiling_s + features_s + prediction_s, "tiles": len(plan.coords),
            "grid_tiles": plan.grid_tiles, "level": plan.level, "read_size": plan.read_size, "probs": probs}
