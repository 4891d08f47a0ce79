"""
Random Feature Reconstruction (RFR): rebuild random crops of a stage's input from its output.

Rebuilding the whole slide is too costly, so U_i samples a few locations per slide, crops p x p from the
stage output x_i and the matching (p*u) x (p*u) window from its input x_{i-1}, and reconstructs the
latter from the former (bilinear upsample by u, two 3x3 convs) under an L1 loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distlocal.model.tiling import window

__all__ = ["FeatureReconstruction"]


class FeatureReconstruction(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, factor: int, patch: int, patches: int = 10):
        """`in_channels` / `out_channels` are the stage's (C_{i-1} / C_i); `factor` is its downsampling u."""
        super().__init__()
        self.factor, self.patch, self.patches = factor, patch, patches
        upsample = nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)
        self.reconstruct = nn.Sequential(
            upsample if factor > 1 else nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, in_channels, 3, padding=1),
        )

    def crop_size(self, x_out: torch.Tensor, x_in: torch.Tensor) -> int:
        """Patch side that fits both maps: the configured one, clamped on small slides."""
        u = self.factor
        return min(self.patch, x_out.shape[-2], x_out.shape[-1], x_in.shape[-2] // u, x_in.shape[-1] // u)

    def corners(self, x_out: torch.Tensor, x_in: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[int, list[tuple[int, int]]]:
        """The patch side and the random top-left corners (on x_out) of this slide's crops."""
        p, u = self.crop_size(x_out, x_in), self.factor
        ys = torch.randint(0, min(x_out.shape[-2], x_in.shape[-2] // u) - p + 1, (self.patches,), generator=generator)
        xs = torch.randint(0, min(x_out.shape[-1], x_in.shape[-1] // u) - p + 1, (self.patches,), generator=generator)
        return p, list(zip(ys.tolist(), xs.tolist(), strict=True))

    def crops(self, x_out: torch.Tensor, x_in: torch.Tensor, p: int, corners: list[tuple[int, int]]):
        """The windows at ``corners`` of both maps: (n x C_i x p x p, n x C_{i-1} x pu x pu)."""
        u = self.factor
        src = torch.stack([x_out[0, :, y:y + p, x:x + p] for y, x in corners])
        # x_in may be read by region (model.stream_stem=recompute: stage 1's stem map is never whole)
        tgt = torch.stack([window(x_in, y * u, (y + p) * u, x * u, (x + p) * u)[0] for y, x in corners])
        return src, tgt

    def sample(self, x_out: torch.Tensor, x_in: torch.Tensor, generator: torch.Generator | None = None):
        """Crop the same random windows from both maps: (n x C_i x p x p, n x C_{i-1} x pu x pu)."""
        return self.crops(x_out, x_in, *self.corners(x_out, x_in, generator))

    def loss(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """L1 between the reconstruction of the output crops ``src`` and the input crops ``tgt``."""
        return F.l1_loss(self.reconstruct(src), tgt.to(src.dtype))

    def forward(self, x_out: torch.Tensor, x_in: torch.Tensor, generator: torch.Generator | None = None):
        """Return (L1 loss, patch side used); the side is below `patch` when the slide is small."""
        src, tgt = self.sample(x_out, x_in, generator)
        return self.loss(src, tgt), src.shape[-1]
