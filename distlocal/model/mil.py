"""
Gated-attention MIL classifiers: the auxiliary classifiers A_i and the head H.

Every spatial position of a strided-conv summary of the feature map is one instance; gated attention
(Ilse et al. 2018) pools them into one slide vector, which a small MLP classifies.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AuxClassifier", "GatedAttentionPool", "classifier_kernel"]


def classifier_kernel(level: int, kernels: list[int]) -> int:
    """
    Strided-conv kernel for a map `level` times coarser than the stem output, from model.classifier_kernels (one per
    backbone layer: layer1 keeps the stem's stride, each later layer halves it, so level 1, 2, 4, 8 is layer 1..4).
    """
    return kernels[min(len(kernels) - 1, max(0, round(math.log2(level))))]


class GatedAttentionPool(nn.Module):
    """a = softmax(w^T (tanh(V h) * sigmoid(U h))) over instances; pooled = sum_l a_l h_l."""

    def __init__(self, dim: int, mid: int, dropout: float = 0.2):
        super().__init__()
        self.v = nn.Linear(dim, mid)
        self.u = nn.Linear(dim, mid)
        self.w = nn.Linear(mid, 1)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, generator: torch.Generator | None = None):
        a = torch.softmax(self.scores(h), dim=0)
        return self.dropped(a, generator) @ h, a

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """The attention scores w^T (tanh(V h) * sigmoid(U h)) of instances ``h`` (n x dim), before the softmax."""
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)

    def dropped(self, a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The attention that pools: with attention dropout in training, one draw per instance from ``generator``."""
        if self.training and self.dropout > 0:
            # Our own mask from the stage's generator, so a stage's randomness does not depend on
            # what else ran in the process (local and Ray executors then agree bit for bit).
            keep = torch.rand(a.shape, generator=generator) >= self.dropout
            return a * keep.to(a.device, a.dtype) / (1 - self.dropout)
        return a


class AuxClassifier(nn.Module):
    """Strided conv + GroupNorm + ReLU, gated-attention pooling, then Linear-ReLU-Linear."""

    def __init__(self, channels: int, num_classes: int, kernel: int, mid: int, feature_dim: int):
        super().__init__()
        self.kernel = kernel
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, channels, kernel, stride=kernel, bias=False),
            nn.GroupNorm(channels, channels),
            nn.ReLU(inplace=True),
        )
        self.pool = GatedAttentionPool(channels, mid)
        self.classify = nn.Sequential(
            nn.Linear(channels, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, num_classes)
        )

    @classmethod
    def auxiliary(cls, channels: int, num_classes: int, kernel: int) -> AuxClassifier:
        """A_i of the paper: attention width C/2, 128 features."""
        return cls(channels, num_classes, kernel, mid=channels // 2, feature_dim=128)

    @classmethod
    def head(cls, channels: int, num_classes: int, kernel: int = 5) -> AuxClassifier:
        """H of the paper: attention width 128, 512 features."""
        return cls(channels, num_classes, kernel, mid=128, feature_dim=512)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Return (logits 1 x classes, attention map h' x w') for a 1 x C x H x W feature map."""
        return self.pooled(self.reduce[0](self.pad(x)), generator)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """
        ``x``, padded at the bottom and right when it has fewer than two instances: GroupNorm with one channel per
        group needs more than one position, and the reference crashed on small slides.
        """
        k, (h, w) = self.kernel, x.shape[-2:]
        if (h // k) * (w // k) < 2:
            x = F.pad(x, (0, max(0, 2 * k - w), 0, max(0, k - h)))
        return x

    def pooled(self, z: torch.Tensor, generator: torch.Generator | None = None):
        """
        What follows the strided conv (GroupNorm, ReLU, attention, MLP) on its output ``z``: the part that sees the
        whole map, which a streamed stage runs in chunks of instances instead (model/stream_global.py).
        """
        z = self.reduce[2](self.reduce[1](z))
        instances = z.flatten(2)[0].transpose(0, 1)
        # Attention and the MLP in at least fp32 even under bf16 autocast: bf16 logits (8 significant bits) make
        # near-equal slides tie in the probabilities that AUROC ranks, and this part is a few instances' worth of
        # compute against the backbone's maps.
        # (Only where autocast can be on: the meta device that FLOP counting runs on has no autocast dtype.)
        off = torch.autocast(z.device.type, enabled=False) if z.device.type in ("cpu", "cuda") else nullcontext()
        with off:
            instances = instances.to(torch.promote_types(instances.dtype, torch.float32))
            pooled, attention = self.pool(instances, generator)
            return self.classify(pooled)[None], attention.view(z.shape[-2:])
