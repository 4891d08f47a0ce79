"""
A Stage: one gradient-isolated module F_i with its auxiliary model and its optimizer.

The executors (local, Ray) only move tensors between stages; everything that learns lives here.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distlocal.config import Config
from distlocal.model.backbone import StageSpec, freeze_batchnorm, run_blocks
from distlocal.model.interface import StageInterface
from distlocal.model.mil import AuxClassifier
from distlocal.model.optim import Backward, LocalOptimizer
from distlocal.model.rfr import FeatureReconstruction
from distlocal.model.stream import StreamedStep, Streaming, streamed_evaluation, streamed_step
from distlocal.model.tiling import ModuleRegions, RegionInput, tiled_forward, whole

__all__ = ["STEM_TILE_PIXELS", "Stage", "autocast", "held_dtype", "param_dtype", "peak_memory_mb", "reseed",
           "close_input", "run_stem", "step_metrics", "streamed_stem", "wide"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory since the last reset, in MiB (0 on CPU, where PyTorch does not track it)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when train.precision is bf16, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least fp32 (losses and probabilities out of bf16 autocast); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a stage computes in outside autocast: its parameters' (fp32; float64 in the exactness tests)."""
    return next(module.parameters()).dtype


def held_dtype(module: nn.Module, bf16: bool) -> torch.dtype:
    """
    The dtype a stage holds its input in: the one its computation consumes. Under bf16 autocast the first
    convolution takes bf16, so an fp32 input would be one more map held all step beside the bf16 copy autograd
    saves (the RFR target and the residual's identity read the same values in bf16 alike).
    """
    return torch.bfloat16 if bf16 else param_dtype(module)


def reseed(generator: torch.Generator, seed: int, slide: tuple[int, str] | None) -> None:
    """
    Seed `generator` from (stage seed, epoch, slide_id) when the slide is known: what a slide draws (RFR locations,
    attention dropout) then does not depend on which slides this process saw before, so R replicas of a stage
    draw what one stage would, and a replay draws what the first pass drew.
    """
    if slide is not None:
        epoch, slide_id = slide
        digest = hashlib.blake2b(f"{seed}/{epoch}/{slide_id}".encode(), digest_size=8).digest()
        generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# The frozen stem run whole would hold the slide plus two 64-channel maps at 1/3 scale (conv1's and bn1's outputs:
# 5.7x the slide's bytes, 4.5 GB at 8698 x 7496 in fp32), more than stage 1's whole backward. In tiles of this many
# pixels (exact: tiling.py) only the slide and the 1/6-scale output are whole; the tiles go to the device one by one.
STEM_TILE_PIXELS = 2**22


@dataclass
class _InDtype:
    """A RegionInput whose regions come in ``dtype`` (the stem's: float64 in the exactness tests)."""

    source: RegionInput
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.source.shape

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return self.source.region(y0, y1, x0, x1).to(self.dtype)

    def close(self) -> None:
        self.source.close()


def close_input(x: torch.Tensor | RegionInput) -> None:
    """Close the file a slide read by region opened (a tensor has nothing to close)."""
    if not isinstance(x, torch.Tensor):
        x.close()


def streamed_stem(stem: nn.Module, x: torch.Tensor | RegionInput, device: torch.device, bf16: bool,
                  recompute: bool, tile_pixels: int = STEM_TILE_PIXELS) -> torch.Tensor | RegionInput:
    """
    A streamed step's stem map: held in host memory (run_stem), or with ``recompute`` (model.stream_stem=recompute)
    for a slide read by region, computed region by region where it is read and never held (tiling.ModuleRegions).
    """
    if recompute and not isinstance(x, torch.Tensor):
        return ModuleRegions(stem, x, device, lambda: autocast(device, bf16), held_dtype(stem, bf16))
    return run_stem(stem, x, device, bf16, tile_pixels, host=True)


def run_stem(stem: nn.Module, x: torch.Tensor | RegionInput, device: torch.device, bf16: bool,
             tile_pixels: int = STEM_TILE_PIXELS, host: bool = False) -> torch.Tensor:
    """
    The frozen stem on a 1 x 3 x H x W slide, without gradients, as a map on ``device`` in the dtype the blocks
    consume (held_dtype: bf16 under bf16 autocast, else the stem's); on the slide's device with ``host`` (a streamed
    stage moves it to the device a tile at a time).

    ``x`` may be a RegionInput (model.stream: data/regions.py): each stem tile then reads its own region of the slide,
    so neither the decoded slide nor its full-size float input ever exists; the same tiles as for a tensor, so the
    same map. What stays is the stem map in host memory, 64 channels at 1/6 of the slide's side (conv stride 3, then
    the max-pool's 2): 3.6 bytes per slide pixel in bf16, 7.1 in fp32 (computed: the paper's largest slide,
    23849 x 10257 at 5X, needs 0.87 GB in bf16 / 1.7 GB in fp32 at 5X, 3.5 / 7.0 GB at 10X, 13.9 / 27.8 GB at 20X),
    beside the stage's output map: the host memory a stage-1 slide needs (engine/capacity.py counts it), where its
    20X input whole was 11.7 GB of uint8 plus 47 GB of fp32.
    """
    dtype = param_dtype(stem)
    regions = None if isinstance(x, torch.Tensor) else x
    try:
        if x.shape[-2] * x.shape[-1] <= tile_pixels and not host:
            x = whole(x).to(device, non_blocking=True)  # one pass on the device; larger slides stay in host memory
        x = _InDtype(x, dtype) if not isinstance(x, torch.Tensor) else x.to(dtype)
        with torch.no_grad(), autocast(device, bf16):
            out = tiled_forward(stem.eval(), x, tile_pixels, device)
    finally:
        if regions is not None:
            regions.close()
    held = held_dtype(stem, bf16)
    return out.to(held) if host else out.to(device, held)


def step_metrics(optim: LocalOptimizer, device: torch.device, start: float, logits: torch.Tensor, y: int,
                 loss_cls: torch.Tensor, loss_rec: torch.Tensor, loss: torch.Tensor, stepped: bool,
                 patch: int = 0, streamed: bool = False) -> dict:
    """The numbers a training step reports (plain floats, cheap to send from a Ray actor)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    lrs = optim.lrs
    return {
        "loss_cls": loss_cls.item(), "loss_rec": loss_rec.item(), "loss": loss.item(),
        "correct": float(logits.argmax(1).item() == y), "lr": lrs["backbone"], "lr_aux": lrs["auxiliary"],
        "step_s": time.perf_counter() - start, "stepped": float(stepped), "rfr_patch": float(patch),
        "peak_mem_mb": peak_memory_mb(device), "streamed": float(streamed),
    }


class Stage(StageInterface):
    """
    F_i + A_i (+ U_i), or F_K + H on the last stage; trains on one slide at a time.

    Example::

        x1, metrics = stages[0].train_step(slide, label)   # x1 is detached: no gradient flows back
        x2, metrics = stages[1].train_step(x1, label)
    """

    def __init__(self, spec: StageSpec, blocks: list[nn.Module], classifier: AuxClassifier,
                 rfr: FeatureReconstruction | None, stem: nn.Module | None, cfg: Config,
                 device: torch.device, generator_seed: int, is_last: bool, streaming: Streaming | None = None):
        self.spec, self.device, self.is_last = spec, torch.device(device), is_last
        self.modules = nn.ModuleDict({"backbone": nn.Sequential(*blocks), "classifier": classifier})
        if stem is not None:  # stage 1 runs the frozen stem; the RFR target of stage 1 is its output
            self.modules["stem"] = stem
        if rfr is not None:
            self.modules["rfr"] = rfr
        self.modules.to(self.device)
        auxiliary = nn.ModuleList([m for k, m in self.modules.items() if k in ("classifier", "rfr")])
        self.optim = LocalOptimizer(self.modules["backbone"], auxiliary, cfg.train)
        self.alpha = cfg.model.rfr.alpha
        self.bf16 = cfg.train.precision == "bf16"
        self.recompute = cfg.train.recompute_activations
        self.seed = generator_seed
        self.generator = torch.Generator().manual_seed(generator_seed)  # RFR locations, attention dropout
        self.driver_steps = False  # a replica: the driver decides when the window steps (optim.step with a reduce)
        self.rfr_clamped = 0  # slides whose maps were smaller than the RFR patch
        self.stem_tile_pixels = STEM_TILE_PIXELS
        self.streaming = streaming  # model.stream: when and in which tiles a slide trains streamed; None: never
        self.recompute_stem = cfg.model.stream_stem == "recompute"

    def _autocast(self):
        return autocast(self.device, self.bf16)

    def _input(self, x: torch.Tensor, host: bool = False) -> torch.Tensor:
        """The stage input on the device, or where it is with ``host`` (a streamed step moves it tile by tile)."""
        if "stem" in self.modules:
            return run_stem(self.modules["stem"], x, self.device, self.bf16, self.stem_tile_pixels, host)
        if host:
            return x.to(dtype=held_dtype(self.modules, self.bf16))
        return x.to(self.device, held_dtype(self.modules, self.bf16), non_blocking=True)

    def _streamed_input(self, x: torch.Tensor | RegionInput) -> torch.Tensor | RegionInput:
        """
        A streamed step's input, in host memory; stage 1 reading its slide by region with model.stream_stem=recompute:
        its stem map, computed region by region where it is read and never held (tiling.ModuleRegions).
        """
        if "stem" in self.modules:
            return streamed_stem(self.modules["stem"], x, self.device, self.bf16, self.recompute_stem,
                                 self.stem_tile_pixels)
        return self._input(x, host=True)

    def _streamed_step(self, x: torch.Tensor, target: torch.Tensor, tile_out: int) -> StreamedStep:
        """F_i and A_i's first conv tile by tile, the rest with autograd (model/stream.py); RFR's crops join it."""
        rfr = self.modules["rfr"] if "rfr" in self.modules else None
        step = streamed_step(self.modules["backbone"], self.modules["classifier"], self._streamed_input(x), target,
                             tile_out, self.device, self._autocast, self.generator, rfr, self.alpha, wide)
        if "rfr" in self.modules:
            self.rfr_clamped += step.patch < self.modules["rfr"].patch
        return step

    def train_step(self, x: torch.Tensor, y: int, slide: tuple[int, str] | None = None) -> tuple[torch.Tensor, dict]:
        """
        Forward, local loss, backward; step every `accumulate` slides (unless `driver_steps`). `slide` is
        (epoch, slide_id), from which the slide's random draws are seeded. Returns (detached output, metrics).
        """
        start = time.perf_counter()
        reseed(self.generator, self.seed, slide)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.modules.train()
        freeze_batchnorm(self.modules["backbone"])
        target = torch.tensor([y], device=self.device)
        if self.streams(x):
            try:
                step = self._streamed_step(x, target, self.streaming.tile_out(self.spec))
                stepped = self._backward(step.loss, step.backward)
            finally:
                close_input(x)  # a slide read by region: its file (model.stream_stem=recompute reads it to the end)
            metrics = step_metrics(self.optim, self.device, start, step.logits, y, step.loss_cls, step.loss_rec,
                                   step.loss, stepped, step.patch, streamed=True)
            return step.out, metrics
        out, logits, loss_cls, loss_rec, patch, loss = self._whole_step(x, target, self.generator)
        if "rfr" in self.modules:
            self.rfr_clamped += patch < self.modules["rfr"].patch
        stepped = self._backward(loss)
        metrics = step_metrics(self.optim, self.device, start, logits, y, loss_cls, loss_rec, loss, stepped, patch)
        return out.detach(), metrics

    def slide_pixels(self, x: torch.Tensor) -> int:
        """The slide pixels behind a stage input: stage 1 takes the slide, a later stage a map of in_stride."""
        scale = 1 if "stem" in self.modules else self.spec.in_stride
        return x.shape[-2] * x.shape[-1] * scale * scale

    def _whole_step(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator):
        """The whole-slide forward and loss: (output, logits, CE, RFR loss, RFR patch, loss with its graph)."""
        x = self._input(x)
        with self._autocast():
            out = run_blocks(self.modules["backbone"], x, self.recompute)
            logits, _ = self.modules["classifier"](out, generator)
            loss_cls = F.cross_entropy(wide(logits), target)
            loss_rec, patch = torch.zeros((), device=self.device), 0
            if "rfr" in self.modules:
                loss_rec, patch = self.modules["rfr"](out, x, generator)
            loss = loss_cls + self.alpha * wide(loss_rec)
        return out, logits, loss_cls, loss_rec, patch, loss

    def probe_loss(self, x: torch.Tensor) -> torch.Tensor:
        """
        The whole-slide step's loss on ``x`` with its graph, drawing from a generator of its own (model/budget.py
        measures the step's working set from it; the stage's generator, gradients and optimizer stay untouched).
        """
        self.modules.train()
        freeze_batchnorm(self.modules["backbone"])
        target = torch.zeros(1, dtype=torch.long, device=self.device)
        return self._whole_step(x, target, torch.Generator().manual_seed(0))[-1]

    def _backward(self, loss: torch.Tensor, backward: Backward = torch.Tensor.backward) -> bool:
        """Accumulate the slide's gradients; step every `accumulate` slides unless the driver steps (replicas)."""
        if self.driver_steps:
            self.optim.add(loss, backward)
            return False
        return self.optim.backward(loss, backward)

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward only. Returns (output, class probabilities, attention map on the CPU)."""
        self.modules.eval()
        if self.streams(x):  # as the slide trains: tile by tile
            try:
                out, logits, attention = streamed_evaluation(self.modules["backbone"], self.modules["classifier"],
                                                             self._streamed_input(x),
                                                             self.streaming.tile_out(self.spec), self.device,
                                                             self._autocast)
            finally:
                close_input(x)
            return out, torch.softmax(wide(logits), 1)[0].cpu(), wide(attention).cpu()
        x = self._input(x)
        with self._autocast():
            out = self.modules["backbone"](x)
            logits, attention = self.modules["classifier"](out)
        return out, torch.softmax(wide(logits), 1)[0].cpu(), wide(attention).cpu()

    def inference_parts(self) -> tuple[nn.Module, nn.Module]:
        """(features: the stem on stage 1, then the blocks F_i; classifier: A_i, or H on the last stage)."""
        features = [self.modules["stem"]] if "stem" in self.modules else []
        return nn.Sequential(*features, self.modules["backbone"]), self.modules["classifier"]

    def state_dict(self) -> dict:
        return {
            "index": self.spec.index,
            "modules": self.modules.state_dict(),
            "optim": self.optim.state_dict(),
            "generator": self.generator.get_state(),
            "rfr_clamped": self.rfr_clamped,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["index"] != self.spec.index:
            raise ValueError(f"checkpoint is for stage {state['index'] + 1}, not stage {self.spec.index + 1}")
        self.modules.load_state_dict(state["modules"])
        self.optim.load_state_dict(state["optim"])
        self.generator.set_state(state["generator"])
        self.rfr_clamped = state["rfr_clamped"]
