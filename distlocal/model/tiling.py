"""
Exact tiled inference: run a stage over overlapping tiles of its input and stitch the outputs.

With every BatchNorm frozen (eval mode) a ResNet stage is convolutions, max-pools and pointwise maps, so each output
position depends only on a bounded window of the input. A tile cut at a multiple of the stage's total stride, with
a halo at least that window's reach on each inner side, computes its inner outputs exactly as the whole map would
(only float summation order may differ). A slide too large for device memory then runs tile by tile, with the whole
input and output maps kept in host memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

__all__ = ["INDEX_LIMIT", "Footprint", "ModuleRegions", "RegionInput", "fit_tile", "footprint", "grid", "halo",
           "index_tile", "input_window", "stitched_forward", "tile_plan", "tiled_forward", "whole", "window"]

INDEX_LIMIT = 2**31 - 1  # elements: cuDNN and many CUDA kernels index a tensor with 32 bits


class RegionInput(Protocol):
    """
    A 1 x C x H x W input read by region instead of held whole (a streamed stage 1 reads its slide so: the
    loader's data.regions.SlideRegions): ``region(y0, y1, x0, x1)`` is the tensor ``x[..., y0:y1, x0:x1]`` would be,
    in host memory; ``close`` releases what the reads opened.
    """

    shape: tuple[int, int, int, int]

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor: ...

    def close(self) -> None: ...


def whole(x: torch.Tensor | RegionInput) -> torch.Tensor:
    """A tensor, or a RegionInput read whole (where it fits: a small slide, or a stage that does not stream)."""
    return x if isinstance(x, torch.Tensor) else x.region(0, x.shape[-2], 0, x.shape[-1])


def _home(x: torch.Tensor | RegionInput) -> torch.device:
    """Where a stitched output is kept: the input's device, host memory for a RegionInput."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


@dataclass(frozen=True)
class Footprint:
    """How outputs map to input pixels along one axis: output j sees input [j*stride - reach, j*stride + reach]."""

    stride: int
    reach: int
    layers: tuple[tuple[int, int, int, int], ...]  # (kernel, stride, padding, dilation) along the main path

    def out_size(self, n: int) -> int:
        """Output length for an input of length ``n`` (PyTorch's floor rule, layer by layer)."""
        for k, s, p, d in self.layers:
            n = (n + 2 * p - d * (k - 1) - 1) // s + 1
        return n


def _pair(v) -> int:
    return v[0] if isinstance(v, tuple) else v


def _layers(module: nn.Module) -> list[tuple[int, int, int, int]]:
    if hasattr(module, "conv1") and hasattr(module, "conv2"):  # a residual block: its main branch sets the footprint
        convs = [module.conv1, module.conv2] + ([module.conv3] if hasattr(module, "conv3") else [])
        return [layer for conv in convs for layer in _layers(conv)]
    if isinstance(module, nn.Conv2d | nn.MaxPool2d):
        k, s, p, d = (_pair(getattr(module, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
        if isinstance(module, nn.MaxPool2d) and module.ceil_mode:
            raise ValueError("tiled inference does not support ceil_mode max-pools")
        return [(k, s, p, d)]
    if isinstance(module, nn.AvgPool2d | nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        raise ValueError(f"tiled inference needs local operations; {type(module).__name__} mixes the whole map")
    return [layer for child in module.children() for layer in _layers(child)]


def footprint(module: nn.Module) -> Footprint:
    """The footprint of a stem or a sequence of residual blocks (the same along both axes)."""
    layers = tuple(_layers(module))
    stride, reach = 1, 0
    for k, s, p, d in layers:
        reach += stride * max(p, d * (k - 1) - p)
        stride *= s
    return Footprint(stride, reach, layers)


def halo(fp: Footprint) -> int:
    """The input rows a tile adds on each inner side: the footprint's reach, rounded up to a multiple of the stride."""
    return math.ceil(fp.reach / fp.stride) * fp.stride  # a multiple of the stride keeps the sampling grids aligned


def input_window(a: int, b: int, n: int, fp: Footprint) -> tuple[int, int]:
    """
    Along one axis of an input of length ``n``: the input rows [start, end) whose output rows include [a, b) exactly,
    at the same offset in the sampling grid (start is a multiple of the stride) and with the map's own padding only
    where the window meets its edge. Output row a is then row ``a - start // fp.stride`` of the window's output.
    """
    start = max(0, a * fp.stride - halo(fp))
    end = n if b == fp.out_size(n) else min(n, (b - 1) * fp.stride + fp.reach + 1)
    return start, end


def tile_plan(n: int, fp: Footprint, tile_out: int) -> Iterator[tuple[int, int, int, int]]:
    """Along one axis: (out_start, out_end, in_start, in_end) per tile of at most ``tile_out`` output positions."""
    total = fp.out_size(n)
    for a in range(0, total, tile_out):
        b = min(total, a + tile_out)
        yield a, b, *input_window(a, b, n, fp)


def tiled_forward(module: nn.Module, x: torch.Tensor | RegionInput, max_tile_pixels: int | None,
                  device: torch.device | None = None) -> torch.Tensor:
    """
    ``module(x)`` computed tile by tile, each input tile at most about ``max_tile_pixels`` pixels, on ``device``.

    ``x`` (1 x C x H x W) may stay in host memory, or be a RegionInput whose tiles are read as they are needed; the
    stitched output is returned on ``x``'s device (host memory for regions). Without a limit, or when the whole
    input fits it, this is one ordinary forward pass.
    """
    device = device or _home(x)
    height, width = x.shape[-2:]
    if not max_tile_pixels or height * width <= max_tile_pixels:
        return module(whole(x).to(device)).to(_home(x))
    fp = footprint(module)
    margin = halo(fp)
    tile_out = (math.isqrt(max_tile_pixels) - 2 * margin) // fp.stride
    if tile_out < 1:
        least = (2 * margin + 4 * fp.stride) ** 2
        raise ValueError(f"tiles of {max_tile_pixels} px cannot hold one output of a stage whose outputs each see "
                         f"{2 * fp.reach + 1} x {2 * fp.reach + 1} px; raise predict.max_tile_pixels (at least "
                         f"{least}, better 100x that)")
    return stitched_forward(module, x, tile_out, device, fp)


def stitched_forward(module: nn.Module, x: torch.Tensor | RegionInput, tile_out: int, device: torch.device,
                     fp: Footprint | None = None) -> torch.Tensor:
    """
    ``module(x)`` in tiles of ``tile_out`` x ``tile_out`` outputs (plus halos) on ``device``, stitched on x's
    device (host memory for a RegionInput, whose tiles are read one at a time).
    """
    fp = fp or footprint(module)
    height, width = x.shape[-2:]
    home = _home(x)
    out = None
    tiles = list(grid(height, width, fp, tile_out))
    for ((r0, r1, c0, c1), _, (oy, ox)), tile in zip(tiles, _read_ahead(x, [t[1] for t in tiles]), strict=True):
        part = module(tile.to(device))
        if out is None:  # stitched in the layout the module gives (channels_last in predict): no copy later
            shape = (x.shape[0], part.shape[1], fp.out_size(height), fp.out_size(width))
            nhwc = part.is_contiguous(memory_format=torch.channels_last) and not part.is_contiguous()
            layout = torch.channels_last if nhwc else torch.contiguous_format
            out = torch.empty(shape, dtype=part.dtype, device=home, memory_format=layout)
        out[..., r0:r1, c0:c1] = part[..., oy:oy + r1 - r0, ox:ox + c1 - c0].to(home)
    return out


def window(x: torch.Tensor | RegionInput, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Rows y0:y1, columns x0:x1 of a map held whole (a slice) or read by region."""
    return x[..., y0:y1, x0:x1] if isinstance(x, torch.Tensor) else x.region(y0, y1, x0, x1)


@dataclass
class ModuleRegions:
    """
    A frozen ``module``'s output on a RegionInput, computed region by region where it is read and never held whole
    (model.stream_stem=recompute: stage 1's stem map). Each region's input window adds the module's halo, clamped at
    the map's edges as tile_plan's tiles are, so every output is the whole map's (the same sums). ``context`` (bf16
    autocast) is entered in each call: a region may be read on another thread (_read_ahead), and autocast is
    per thread. Regions come on ``device`` in ``dtype`` (the dtype the held map would have).
    """

    module: nn.Module
    source: RegionInput
    device: torch.device
    context: Callable[[], AbstractContextManager]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.fp = footprint(self.module)
        self.channels = [m for m in self.module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.in_dtype = next(self.module.parameters()).dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        height, width = self.source.shape[-2:]
        return 1, self.channels, self.fp.out_size(height), self.fp.out_size(width)

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        height, width = self.source.shape[-2:]
        (top, bottom), (left, right) = input_window(y0, y1, height, self.fp), input_window(x0, x1, width, self.fp)
        oy, ox = y0 - top // self.fp.stride, x0 - left // self.fp.stride
        part = self.source.region(top, bottom, left, right).to(self.device, self.in_dtype)
        with torch.no_grad(), self.context():
            out = self.module.eval()(part)
        return out[..., oy:oy + y1 - y0, ox:ox + x1 - x0].to(self.dtype)

    def close(self) -> None:
        self.source.close()


def _read_ahead(x: torch.Tensor | RegionInput, boxes: list[tuple[int, int, int, int]]) -> Iterator[torch.Tensor]:
    """
    The input of each tile in turn. A RegionInput's next region is read (decoded, augmented, normalised) on a thread
    while the current tile computes: the device does not wait for the slide's decoding, and one region more is held.
    """
    if isinstance(x, torch.Tensor):
        yield from (x[..., y0:y1, x0:x1] for y0, y1, x0, x1 in boxes)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="region-read") as pool:
        ahead = [pool.submit(x.region, *box) for box in boxes[:1]]
        for i in range(len(boxes)):
            tile = ahead.pop().result()
            if i + 1 < len(boxes):
                ahead.append(pool.submit(x.region, *boxes[i + 1]))
            yield tile


def grid(height: int, width: int, fp: Footprint, tile_out: int) -> Iterator[tuple[tuple[int, int, int, int], ...]]:
    """
    The 2-D tiles of an H x W input: ((out rows r0:r1, out cols c0:c1), (input rows y0:y1, cols x0:x1), (oy, ox):
    where the tile's own outputs start in the module's output on that input). The output tiles partition the map.
    """
    for r0, r1, y0, y1 in tile_plan(height, fp, tile_out):
        for c0, c1, x0, x1 in tile_plan(width, fp, tile_out):
            yield (r0, r1, c0, c1), (y0, y1, x0, x1), (r0 - y0 // fp.stride, c0 - x0 // fp.stride)


def fit_tile(stages: list[nn.Module], device: torch.device) -> int | None:
    """
    On CUDA, the largest tile (input pixels) that every one of ``stages`` (feature extractors run in turn) can take
    at once: its forward fits half the free memory and no tensor passes 2**31 elements. None elsewhere: whole
    slides.
    """
    if device.type != "cuda":
        return None
    per_pixel = max(_probe(stage, device, 512)[0] for stage in stages)  # bytes of the hungriest stage
    free, _ = torch.cuda.mem_get_info(device)
    # On a large GPU the memory bound alone allows tiles with a tensor past 2**31 elements, which 32-bit indexing
    # cannot address: a later stage's input alone has 128-512 elements per pixel, conv1's output 16 on the slide.
    return min(int(0.5 * free / max(per_pixel, 1.0)), index_tile(stages, device))


def index_tile(stages: list[nn.Module], device: torch.device, probe: int = 128) -> int:
    """The largest tile (pixels) whose every intermediate tensor stays under 2**31 elements, from a small probe."""
    return int(INDEX_LIMIT / max(_probe(stage, device, probe)[1] for stage in stages))


@torch.no_grad()
def _probe(stage: nn.Module, device: torch.device, side: int) -> tuple[float, float]:
    """
    One forward of ``stage`` on a side x side input: (peak CUDA bytes, the largest tensor's elements), both per
    input pixel (bytes 0 off CUDA).
    """
    channels = next(m for m in stage.modules() if isinstance(m, nn.Conv2d)).in_channels
    largest = [side * side * channels]

    def note(module, args, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel())

    hooks = [m.register_forward_hook(note) for m in stage.modules() if not list(m.children())]
    cuda = device.type == "cuda"
    try:
        probe = torch.zeros(1, channels, side, side, device=device)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        stage(probe)
        peak = torch.cuda.max_memory_allocated(device) - base if cuda else 0.0
    finally:
        for hook in hooks:
            hook.remove()
    return peak / side**2, largest[0] / side**2
