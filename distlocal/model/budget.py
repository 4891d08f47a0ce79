"""
A stage's training step in bytes, measured once, and what follows from it: model.stream=auto (stream a slide only
when its whole-slide step would not fit train.memory_gb) and model.stream_tile=auto (the largest tile that fits).

A step holds its weights, gradients and AdamW state whatever the slide (``fixed``), and activations in proportion
to the slide's pixels (``per_pixel``). One probe per stage measures that proportion on two small random inputs: on
CUDA a real step's torch.cuda.max_memory_allocated, elsewhere the bytes autograd holds for backward at their peak
(SavedTensors, which bench memory counts with too). Deciding a slide is then arithmetic, not a trial step.

Example::

    work = working_set(stage)                      # two probe steps, nothing of the stage's state moves
    work.whole(8698 * 7496) <= budget_bytes(cfg.train, stage.device)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from distlocal.config import Config, ConfigError, TrainConfig
from distlocal.model.stream import Streaming
from distlocal.model.tiling import footprint, halo

__all__ = ["GB", "SavedTensors", "WorkingSet", "budget_bytes", "host_memory_bytes", "plan_streaming", "state_bytes",
           "working_set"]

log = logging.getLogger(__name__)

GB = 1e9
PROBE_SIDES = (256, 512)  # slide pixels a side: a fraction of a second per stage on a CPU, already linear
# A streamed step holds one tile's rerun (or one chunk of the global part's recomputation, no larger), plus what the
# slide's size does not change (the classifier's MLP, RFR's crops; z and its gradient stay in host memory) and the
# allocator's slack: a tile gets half the budget.
TILE_SHARE = 0.5


class _Held:
    """A tensor saved for backward, counted while autograd holds it (released with the graph's node)."""

    __slots__ = ("key", "owner", "tensor")

    def __init__(self, tensor: torch.Tensor, key: int, owner: SavedTensors):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner._release(self.key)


class SavedTensors:
    """
    The storages autograd saves for backward while a step runs (a context manager), each storage counted once:
    ``total``, every storage it saved, and ``peak``, the most it held at one moment (a streamed step frees each
    tile's before the next); ``first_peak`` and ``later_peak`` split it at the first release (a streamed step's
    global part's autograd (the MLP and RFR's crops), saved before its backward starts, and the chunks' and tiles'
    reruns after).

    ``held``: storages kept for backward some other way (the block inputs that recomputation keeps), by key; counted
    in ``total`` with the rest. ``exclude``: storages counted elsewhere (parameters, which a convolution saves for
    its backward too, and the stage's input).
    """

    def __init__(self, held: dict[int, int] | None = None, exclude: set[int] = frozenset()):
        self.seen = held if held is not None else {}
        self.exclude = exclude
        self.count: dict[int, int] = {}
        self.now = self.peak = self.first_peak = self.later_peak = 0
        self.released = False

    def __enter__(self) -> SavedTensors:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(v for k, v in self.seen.items() if k not in self.exclude)

    def _pack(self, t: torch.Tensor):
        base = t._base
        if base is not None and base.grad_fn is None and not base.requires_grad:
            # A tile cut from a map held outside the step (a streamed stage's host map): on a device it is a copy of
            # its own, not the map (on a CPU the tile's .to(device) is the map's view).
            key, nbytes = t.data_ptr(), t.numel() * t.element_size()
        else:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        self.seen[key] = nbytes
        # Detached: a saved output packed as itself would hold its own grad_fn, a cycle that no collector frees
        # when backward never runs (bench memory's reruns): 0.7 GB a stage at 4096 x 3072 before this.
        if key in self.exclude:
            return t.detach()
        if not self.count.get(key):
            self.now += self.seen[key]
            self.peak = max(self.peak, self.now)
            if self.released:
                self.later_peak = max(self.later_peak, self.now)
            else:
                self.first_peak = self.now
        self.count[key] = self.count.get(key, 0) + 1
        return _Held(t.detach(), key, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, key: int) -> None:
        self.count[key] -= 1
        if not self.count[key]:
            self.now -= self.seen[key]
            self.released = True


def state_bytes(modules) -> dict[str, int]:
    """Parameters, their gradients and AdamW's two moments (exp_avg, exp_avg_sq) of ``modules``."""
    params = [p for m in modules for p in m.parameters()]
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {"params": sum(p.numel() * p.element_size() for p in params), "grads": trainable,
            "optimizer": 2 * trainable}


def host_memory_bytes() -> int:
    """Memory this node can still give: MemAvailable, within this process's cgroup limit (a container's)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the physical memory
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2, then v1
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                available = min(available, int(a.read()) - int(b.read()))
            break
        except (OSError, ValueError):  # no such cgroup, or "max": no limit
            continue
    return available


def budget_bytes(train: TrainConfig, device: torch.device) -> int:
    """train.memory_gb, or by default the device's free memory on CUDA (probed now), the host's on a CPU."""
    if train.memory_gb:
        return int(train.memory_gb * GB)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_memory_bytes()


@dataclass(frozen=True)
class WorkingSet:
    """A stage's training step: ``fixed`` bytes whatever the slide, plus ``per_pixel`` bytes per slide pixel."""

    fixed: int
    per_pixel: float
    halo: int  # slide pixels a streamed tile adds on each side (its footprint's halo)
    stride: int  # slide pixels between the stage's outputs: a tile is a whole number of them

    def whole(self, pixels: int) -> float:
        """Bytes of the whole-slide step on a slide of ``pixels``."""
        return self.fixed + self.per_pixel * pixels

    def limit(self, budget: int) -> int:
        """The most slide pixels whose whole-slide step fits ``budget`` bytes."""
        return int(max(0, budget - self.fixed) / max(self.per_pixel, 1e-9))

    def tile(self, budget: int) -> int | None:
        """The largest tile side (slide pixels) whose rerun fits TILE_SHARE of ``budget``; None when none does."""
        room = TILE_SHARE * budget - self.fixed
        side = int((max(room, 0) / max(self.per_pixel, 1e-9)) ** 0.5) - 2 * self.halo
        side -= side % self.stride
        return side if side >= self.stride else None


def _takes_slide(stage) -> bool:
    return hasattr(stage, "net") or "stem" in stage.modules  # E2E and stage 1 run the stem on the slide


def _parameters(stage) -> list[torch.nn.Parameter]:
    return list((stage.net if hasattr(stage, "net") else stage.modules).parameters())


def _probe(stage, side: int) -> int:
    """Bytes of one whole-slide step of ``stage`` on a random side x side slide's input (its gradients restored)."""
    spec, device = stage.spec, stage.device
    if _takes_slide(stage):
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    else:
        n = max(1, side // spec.in_stride)
        x = torch.randn(1, spec.in_channels, n, n, generator=torch.Generator().manual_seed(0))
    params = _parameters(stage)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        with SavedTensors(exclude={p.untyped_storage().data_ptr() for p in params}) as saved:
            loss = stage.probe_loss(x)
            if cuda:  # the gradients' buffers count on a device; on a CPU what is saved peaks before backward
                loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        return saved.peak
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def working_set(stage) -> WorkingSet:
    """``stage``'s WorkingSet from two probe steps (PROBE_SIDES): the slope per pixel, the rest fixed."""
    small, large = (_probe(stage, side) for side in PROBE_SIDES)
    pixels = [side * side for side in PROBE_SIDES]
    per_pixel = max(0.0, (large - small) / (pixels[1] - pixels[0]))
    state = sum(state_bytes([stage.net if hasattr(stage, "net") else stage.modules]).values())
    constant = max(0, int(small - per_pixel * pixels[0]))  # the classifier's and RFR's parts that do not grow
    blocks = stage.net.blocks if hasattr(stage, "net") else stage.modules["backbone"]
    return WorkingSet(state + constant, per_pixel, halo(footprint(blocks)) * stage.spec.in_stride,
                      stage.spec.out_stride)


def plan_streaming(stage, cfg: Config) -> Streaming | None:
    """
    The stage's Streaming from model.stream / model.stream_tile: as given, or (auto) from its measured working set
    against the budget (train.memory_gb, or the device's memory): a slide streams when its whole-slide step would
    not fit, in the largest tile that does.
    """
    m = cfg.model
    if m.stream == "off" or (m.stream == "on" and m.stream_tile != "auto"):
        return Streaming.of(m)
    work, budget = working_set(stage), budget_bytes(cfg.train, stage.device)
    tile = m.stream_tile
    if tile == "auto":
        tile = work.tile(budget)
        if tile is None:
            name = "E2E" if hasattr(stage, "net") else f"stage {stage.spec.index + 1}"
            raise ConfigError(
                f"model.stream_tile=auto: {name}'s weights, gradients and AdamW state ({work.fixed / GB:.3g} GB) and "
                f"its smallest tile ({work.stride} px) need more than {TILE_SHARE:.0%} of the memory budget "
                f"({budget / GB:.3g} GB, train.memory_gb={cfg.train.memory_gb:g}); raise train.memory_gb, or cut the "
                f"backbone into more stages (model.k)")
    limit = None if m.stream == "on" else work.limit(budget)
    log.info("model.stream=%s: stage %d holds %.3g GB + %.1f B per slide pixel; budget %.3g GB: streams slides over "
             "%s px, in tiles of %d px", m.stream, stage.spec.index + 1, work.fixed / GB, work.per_pixel, budget / GB,
             "0" if limit is None else f"{limit:,}", tile)
    return Streaming(tile, limit)
