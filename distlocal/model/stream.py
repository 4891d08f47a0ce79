"""
Streamed training of one stage (model.stream): its device memory is set by a tile, not by the slide.

StreamingCNN's method (Pinckaers et al. 2020) on a local stage, written for distlocal's stages:
- the streamed part, F_i and the first (strided, kernel = stride, unpadded) convolution of A_i or H, runs tile by
  tile without gradients; tiles overlap by their footprint's halo and their valid outputs are stitched into the
  exact maps (tiling.py): F_i's output x_i, kept in host memory, and the reduced map z, k^2 times smaller;
- the global part (GroupNorm, gated attention, MLP on z) runs in chunks of a tile's instances with z and its gradient
  in host memory (stream_global.py), and RFR on its crops with ordinary autograd: they give d loss / d z and
  d loss / d crops;
- the backward runs tile by tile again: the conv, then F_i, each tile's forward rerun with gradients and
  back-propagated with the slice of the map's gradient that the tile's own outputs own. The output tiles partition
  the map, so every position is counted once and the weight gradients sum to the whole-slide backward's. x_i's
  gradient is made tile by tile from z's (output_gradient), so host memory holds the stage's input and output maps
  and no third map of their size.
Every operation of the streamed part is local (frozen BatchNorm is an affine map, folded or not), so the streamed
step equals the whole-slide step up to float summation order (tests/test_stream.py checks it in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distlocal.config import ModelConfig
from distlocal.model.backbone import StageSpec
from distlocal.model.mil import AuxClassifier
from distlocal.model.rfr import FeatureReconstruction
from distlocal.model.stream_global import ChunkedPooled
from distlocal.model.tiling import RegionInput, footprint, grid, stitched_forward, window

__all__ = ["StreamedStep", "Streaming", "output_gradient", "reduced_tile", "streamed_backward", "streamed_classifier",
           "streamed_evaluation", "streamed_forward", "streamed_step", "tile_outputs"]

Autocast = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class Streaming:
    """
    When and how a stage streams: in tiles of ``tile`` slide pixels a side, every slide (model.stream=on) or the
    slides of more than ``limit`` pixels, whose whole-slide step would not fit the memory budget (auto: budget.py).
    """

    tile: int  # model.stream_tile, or the one budget.py fitted for this stage
    limit: int | None = None  # slide pixels up to which the whole-slide step fits; None: every slide streams

    @classmethod
    def of(cls, model: ModelConfig) -> Streaming | None:
        """The stages' streaming from the config when nothing in it is auto; None when model.stream is off."""
        return cls(model.stream_tile) if model.stream == "on" and model.stream_tile != "auto" else None

    def streams(self, pixels: int) -> bool:
        """Whether a slide of ``pixels`` slide pixels trains streamed: arithmetic, no trial step."""
        return self.limit is None or pixels > self.limit

    def tile_out(self, spec: StageSpec) -> int:
        """Output positions per tile side for the stage ``spec`` describes."""
        return tile_outputs(self.tile, spec.out_stride)


def tile_outputs(stream_tile: int, out_stride: int) -> int:
    """
    Output positions per tile side of a stage whose outputs are ``out_stride`` slide pixels apart: model.stream_tile
    is the side, in slide pixels, of the region one tile's outputs cover, so a tile means the same slide area at
    every stage (its input adds the halo its footprint needs).
    """
    return max(1, stream_tile // out_stride)


# The gradient of a map's rows r0:r1, columns c0:c1 (its outputs of one tile), made when the tile needs it; None
# where no gradient reaches them.
RegionGradient = Callable[[int, int, int, int], torch.Tensor | None]


def streamed_backward(module: nn.Module, x: torch.Tensor | RegionInput, grad_out: torch.Tensor | RegionGradient,
                      tile_out: int, device: torch.device, autocast: Autocast) -> None:
    """
    Accumulate into ``module``'s parameters the gradients of <grad_out, module(x)>, tile by tile: each tile's
    forward is rerun with gradients and only its own outputs (a partition of the map) receive their gradient.
    ``grad_out`` is the output map's gradient, or a function that gives it region by region (output_gradient).
    Tiles whose outputs get no gradient are skipped: they would add exactly zero (attention dropout can zero every
    instance's gradient); a RegionGradient says so with None.
    """
    fp = footprint(module)
    for (r0, r1, c0, c1), (y0, y1, x0, x1), (oy, ox) in grid(x.shape[-2], x.shape[-1], fp, tile_out):
        if isinstance(grad_out, torch.Tensor):
            grad = grad_out[..., r0:r1, c0:c1]
            if not grad.any():
                continue
        elif (grad := grad_out(r0, r1, c0, c1)) is None:
            continue
        tile = window(x, y0, y1, x0, x1).to(device)
        with torch.enable_grad(), autocast():
            part = module(tile)[..., oy:oy + r1 - r0, ox:ox + c1 - c0]
        part.backward(grad.to(part.device, part.dtype))
    for p in module.parameters():
        if p.requires_grad and p.grad is None:  # every tile skipped: autograd would have given zeros, not None,
            p.grad = torch.zeros_like(p)  # and AdamW treats the two differently (None: no decay, no moment update)


def output_gradient(conv: nn.Conv2d, grad_z: torch.Tensor, out: torch.Tensor, crops: torch.Tensor | None,
                    corners: list[tuple[int, int]], device: torch.device, autocast: Autocast) -> RegionGradient:
    """
    The gradient d loss / d x_i region by region, so the whole map's gradient is never held beside x_i (host memory).
    z = conv(x_i) with kernel = stride = k and no padding, so each output position's gradient is local:
    d loss / d x_i[c, y, x] = sum_o W[o, c, y % k, x % k] d loss / d z[o, y // k, x // k], a transposed convolution of
    the z positions over the region (zero past the last whole k x k cell, which the conv never read; AuxClassifier.pad
    adds cells only past x_i's edge). RFR's crop gradients ``crops`` (at ``corners``) add where they overlap it.
    """
    k, weight = conv.stride[0], conv.weight
    if conv.kernel_size != (k, k) or conv.stride != (k, k) or conv.padding != (0, 0) or conv.dilation != (1, 1) \
            or conv.groups != 1:
        raise ValueError(f"output_gradient needs a conv with kernel = stride, no padding, dilation or groups: {conv}")
    rows, cols = grad_z.shape[-2:]

    def region(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor | None:
        z0, z1, w0, w1 = r0 // k, min(rows, -(-r1 // k)), c0 // k, min(cols, -(-c1 // k))
        cells = grad_z[..., z0:z1, w0:w1] if z1 > z0 and w1 > w0 else None
        cells = cells if cells is not None and cells.any() else None  # z's gradient is in host memory: no sync
        hits = []  # crops may overlap each other and the region's edge: their gradients add
        for crop, (y, x) in zip(() if crops is None else crops, () if crops is None else corners, strict=True):
            y0, y1, x0, x1 = max(r0, y), min(r1, y + crop.shape[-2]), max(c0, x), min(c1, x + crop.shape[-1])
            if y1 > y0 and x1 > x0:
                hits.append((crop[:, y0 - y:y1 - y, x0 - x:x1 - x], (y0 - r0, y1 - r0, x0 - c0, x1 - c0)))
        if cells is None and not hits:
            return None
        grad = torch.zeros((1, out.shape[1], r1 - r0, c1 - c0), dtype=out.dtype, device=device)
        if cells is not None:
            with torch.no_grad(), autocast():
                part = F.conv_transpose2d(cells.to(device), weight, stride=k)
            top, left = r0 - z0 * k, c0 - w0 * k  # the cells start at or before the region
            h, w = min(r1 - r0, part.shape[-2] - top), min(c1 - c0, part.shape[-1] - left)
            grad[..., :h, :w] = part[..., top:top + h, left:left + w]
        for part, (y0, y1, x0, x1) in hits:
            grad[0, :, y0:y1, x0:x1] += part.to(grad)
        return grad

    return region


@dataclass
class StreamedStep:
    """One slide's streamed forward: its output map and losses, and the tile-by-tile backward that goes with it."""

    out: torch.Tensor  # F_i's output x_i, stitched, detached, in host memory
    logits: torch.Tensor
    loss_cls: torch.Tensor
    loss_rec: torch.Tensor
    patch: int  # RFR's patch side (0 without RFR)
    loss: torch.Tensor  # loss_cls + alpha * loss_rec, with the global part's graph
    _backward: Callable[[torch.Tensor], None]

    def backward(self, scaled_loss: torch.Tensor) -> None:
        """Accumulate every parameter's gradient of ``scaled_loss`` (self.loss times the optimizer's scale)."""
        self._backward(scaled_loss)


def reduced_tile(classifier: AuxClassifier, tile_out: int) -> int:
    """Outputs per tile side of the classifier's first (kernel = stride) conv when F_i runs ``tile_out`` a side."""
    return max(1, tile_out // classifier.kernel)


def streamed_forward(features: nn.Module, classifier: AuxClassifier, x: torch.Tensor, tile_out: int,
                     device: torch.device, autocast: Autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The streamed part's forward without gradients, tile by tile: (F_i's output map in host memory, that map padded
    as the classifier pads it, and the classifier's reduced map z). Training's streamed step and evaluation share it,
    so a slide that trains streamed is also validated and predicted without its whole maps on the device.
    """
    with torch.no_grad(), autocast():
        out = stitched_forward(features, x, tile_out, device)
        padded = classifier.pad(out)
        z = stitched_forward(classifier.reduce[0], padded, reduced_tile(classifier, tile_out), device)
    return out, padded, z


def streamed_evaluation(features: nn.Module, classifier: AuxClassifier, x: torch.Tensor, tile_out: int,
                        device: torch.device, autocast: Autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Evaluation's streamed forward, no gradients: (F_i's output map in host memory, the classifier's logits, its
    attention map); the global part runs in chunks of a tile's instances, as in training.
    """
    out, _, z = streamed_forward(features, classifier, x, tile_out, device, autocast)
    tile_z = reduced_tile(classifier, tile_out)
    with torch.no_grad():
        part = ChunkedPooled(classifier, z, tile_z * tile_z, device)
    return out, part.logits, part.attention_map


def streamed_classifier(classifier: AuxClassifier, x: torch.Tensor, tile_z: int, device: torch.device,
                        autocast: Autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """
    (logits, attention map) of ``classifier`` on a stage map ``x`` held in host memory, no gradients: its first conv
    in tiles of ``tile_z`` x ``tile_z`` outputs, the global part in chunks of as many instances (predict of a slide
    that runs as tiles: the whole map never goes to the device).
    """
    with torch.no_grad(), autocast():
        z = stitched_forward(classifier.reduce[0], classifier.pad(x), tile_z, device)
        part = ChunkedPooled(classifier, z, tile_z * tile_z, device)
    return part.logits, part.attention_map


def streamed_step(features: nn.Module, classifier: AuxClassifier, x: torch.Tensor, target: torch.Tensor,
                  tile_out: int, device: torch.device, autocast: Autocast, generator: torch.Generator | None,
                  rfr: FeatureReconstruction | None = None, alpha: float = 1.0,
                  widen: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> StreamedStep:
    """
    The streamed forward of ``features`` (F_i) and ``classifier`` (A_i or H) on the stage input ``x`` (1 x C x H x W,
    host memory), ``tile_out`` x ``tile_out`` outputs of F_i per tile. The global part draws from ``generator`` in
    the whole-slide step's order (attention dropout, then RFR's locations), so both steps draw the same.
    """
    conv, tile_z = classifier.reduce[0], reduced_tile(classifier, tile_out)
    out, padded, z = streamed_forward(features, classifier, x, tile_out, device, autocast)
    part = ChunkedPooled(classifier, z, tile_z * tile_z, device, generator)  # a tile's instances per chunk
    logits = part.logits
    with autocast():
        loss_cls = F.cross_entropy(widen(logits), target)
        loss_rec, patch, src, corners = torch.zeros((), device=device), 0, None, []
        if rfr is not None:
            patch, corners = rfr.corners(out, x, generator)
            src, tgt = rfr.crops(out, x, patch, corners)
            src = src.to(device).requires_grad_()
            loss_rec = rfr.loss(src, tgt.to(device))
        loss = loss_cls + alpha * widen(loss_rec)

    def backward(scaled_loss: torch.Tensor) -> None:
        scaled_loss.backward()  # the MLP's and RFR's parameters, d loss / d pooled and d loss / d crops
        grad_z = part.backward()
        streamed_backward(conv, padded, grad_z, tile_z, device, autocast)
        grad_out = output_gradient(conv, grad_z, out, None if src is None else src.grad, corners, device, autocast)
        streamed_backward(features, x, grad_out, tile_out, device, autocast)

    return StreamedStep(out, logits, loss_cls, loss_rec, patch, loss, backward)
