"""
The patch-based baseline of the paper's Table 3: tile the 5X slide, extract ResNet features per tile, GABMIL.

This is the standard MIL pipeline (CLAM-style patching, then the gated-attention MIL of Ilse et al. 2018) that
distlocal's whole-slide inference replaces:
- tiling: a tissue mask on a 1/16 thumbnail, the 224 x 224 grid over the slide (edge tiles padded with white
  glass so the grid covers what the whole-slide network sees), and the tiles with at least a quarter tissue
  copied into one uint8 stack;
- features: the same ImageNet ResNet as the whole-slide network (``model.backbone``) with its usual stride-2 stem,
  globally average-pooled, in batches; tiles are normalised on the device;
- prediction: gated attention over the tile features, then a linear classifier.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch import nn

from distlocal.model.fold import fold_batchnorm
from distlocal.model.mil import GatedAttentionPool
from distlocal.model.stage import autocast
from distlocal.predictor import elapsed
from distlocal.slides.tissue import detect_tissue

__all__ = ["GABMIL", "PATCH", "PatchMIL", "tile_slide"]

PATCH = 224  # the tile side of patch-based MIL at 5X
THUMB = 16  # tissue is found on every 16th pixel: 14 mask pixels per tile side
MIN_TISSUE = 0.25  # a tile is kept when at least this fraction of it is tissue


def tile_slide(image: np.ndarray, patch: int = PATCH) -> tuple[np.ndarray, np.ndarray, int]:
    """
    The tissue tiles of an H x W x 3 uint8 slide: (N x patch x patch x 3 stack, N x 2 (row, col) grid positions,
    tiles in the whole grid). A slide without tissue keeps its single most tissue-like tile.
    """
    height, width = image.shape[:2]
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    mask = detect_tissue(image[::THUMB, ::THUMB]).mask
    side = patch // THUMB
    grid = np.zeros((rows * side, cols * side), np.float32)
    grid[: mask.shape[0], : mask.shape[1]] = mask[: rows * side, : cols * side]
    fraction = grid.reshape(rows, side, cols, side).mean(axis=(1, 3))
    keep = fraction >= MIN_TISSUE
    if not keep.any():
        keep.flat[int(fraction.argmax())] = True
    positions = np.argwhere(keep)
    tiles = np.full((len(positions), patch, patch, 3), 255, np.uint8)  # edge tiles: the rest is white glass
    for tile, (row, col) in zip(tiles, positions, strict=True):  # only the kept tiles are copied, never the slide
        part = image[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
        tile[: part.shape[0], : part.shape[1]] = part
    return tiles, positions, rows * cols


class GABMIL(nn.Module):
    """Gated-attention MIL over tile features: Linear-ReLU embedding, gated attention, linear classifier."""

    def __init__(self, in_features: int, num_classes: int, dim: int = 512, mid: int = 128):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(inplace=True))
        self.pool = GatedAttentionPool(dim, mid, dropout=0.0)
        self.classify = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits 1 x classes, attention over the N tiles) for N x in_features tile features."""
        pooled, attention = self.pool(self.embed(features))
        return self.classify(pooled)[None], attention


@dataclass
class PatchMIL:
    """The baseline, ready to time: feature extractor and GABMIL on ``device``."""

    features: nn.Module
    classifier: GABMIL
    device: torch.device
    bf16: bool
    batch: int
    mean: torch.Tensor  # 1 x 3 x 1 x 1 on the device, 0-1 scale
    std: torch.Tensor

    @classmethod
    def build(cls, backbone: str, num_classes: int, device: torch.device, bf16: bool, batch: int,
              mean: list[float], std: list[float], fold: bool = False) -> PatchMIL:
        """``fold``: BatchNorm folded into the convolutions, as train.fold_batchnorm does for ours (a fair race)."""
        net = torchvision.models.get_model(backbone, weights=None)  # speed does not depend on the weights
        if fold:
            fold_batchnorm([block for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for block in layer])
        dim = net.fc.in_features
        net.fc = nn.Identity()  # ResNet up to the global average pool: one feature vector per tile
        stats = [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std)]
        net = net.to(device, memory_format=torch.channels_last).eval()  # the layout predict uses, for both methods
        return cls(net, GABMIL(dim, num_classes).to(device).eval(), device, bf16, batch, *stats)

    @torch.no_grad()
    def extract(self, tiles: np.ndarray) -> torch.Tensor:
        """N x D features of an N x patch x patch x 3 uint8 tile stack, ``batch`` tiles at a time."""
        out = []
        for start in range(0, len(tiles), self.batch):
            x = torch.from_numpy(tiles[start : start + self.batch]).to(self.device)
            x = (x.permute(0, 3, 1, 2).float().div_(255) - self.mean) / self.std  # NHWC in memory: channels_last
            with autocast(self.device, self.bf16):
                out.append(self.features(x).float())
        return torch.cat(out)

    @torch.no_grad()
    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GABMIL on N x D tile features: (class probabilities, attention over the tiles), on the host."""
        with autocast(self.device, self.bf16):
            logits, attention = self.classifier(features)
        return torch.softmax(logits.float(), 1)[0].cpu(), attention.float().cpu()

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> dict:
        """Classify one slide, timing the three steps of Table 3 (seconds, the device synchronised)."""
        start = time.perf_counter()
        tiles, positions, grid = tile_slide(image)
        tiling_s = elapsed(start, self.device)
        start = time.perf_counter()
        features = self.extract(tiles)
        features_s = elapsed(start, self.device)
        start = time.perf_counter()
        probs, attention = self.classify(features)
        prediction_s = elapsed(start, self.device)
        return {"tiling_s": tiling_s, "features_s": features_s, "prediction_s": prediction_s,
                "total_s": tiling_s + features_s + prediction_s, "tiles": len(tiles), "grid_tiles": grid,
                "positions": positions, "probs": probs, "attention": attention}
