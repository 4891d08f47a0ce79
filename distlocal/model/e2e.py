"""
End-to-end baseline: the same backbone and head H, trained by ordinary backpropagation.

Written as a plain network (not as a one-stage split) so that "K=1 local training equals end-to-end
training" is a real check of the Stage machinery, and so memory benchmarks measure what users would
otherwise run. It has the Stage interface, so the executors drive it unchanged.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from distlocal.config import Config
from distlocal.model.backbone import Backbone, StageSpec, freeze_batchnorm, run_blocks
from distlocal.model.interface import StageInterface
from distlocal.model.mil import AuxClassifier
from distlocal.model.optim import LocalOptimizer
from distlocal.model.stage import autocast, close_input, reseed, run_stem, step_metrics, streamed_stem, wide
from distlocal.model.stream import Streaming, streamed_evaluation, streamed_step
from distlocal.model.tiling import RegionInput

__all__ = ["EndToEnd", "WholeSlideNet"]


class WholeSlideNet(nn.Module):
    """stem -> all residual blocks -> H, one graph."""

    def __init__(self, backbone: Backbone, head: AuxClassifier):
        super().__init__()
        self.stem = backbone.stem
        self.blocks = nn.Sequential(*backbone.blocks)
        self.head = head
        self.recompute = False  # train.recompute_activations, set by EndToEnd

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        return self.head(self.run_blocks(self.stem(x)), generator)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The residual blocks on the stem's output."""
        return run_blocks(self.blocks, x, self.recompute)


class EndToEnd(StageInterface):
    """Trains WholeSlideNet end to end with the same optimizer settings as a Stage."""

    def __init__(self, spec: StageSpec, net: WholeSlideNet, cfg: Config, device: torch.device, generator_seed: int,
                 streaming: Streaming | None = None):
        self.spec, self.device, self.is_last = spec, torch.device(device), True
        self.net = net.to(self.device)
        self.net.recompute = cfg.train.recompute_activations
        self.optim = LocalOptimizer(nn.ModuleList([net.stem, net.blocks]), net.head, cfg.train)
        self.bf16 = cfg.train.precision == "bf16"
        self.seed = generator_seed
        self.generator = torch.Generator().manual_seed(generator_seed)
        self.rfr_clamped = 0  # no RFR end to end
        self.driver_steps = False  # a replica: the driver decides when the window steps (optim.step with a reduce)
        self.streaming = streaming  # model.stream=on: StreamingCNN's end-to-end method (model/stream.py)
        self.recompute_stem = cfg.model.stream_stem == "recompute"

    def _autocast(self):
        return autocast(self.device, self.bf16)

    def train_step(self, x: torch.Tensor, y: int, slide: tuple[int, str] | None = None) -> tuple[torch.Tensor, dict]:
        start = time.perf_counter()
        reseed(self.generator, self.seed, slide)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.net.train()
        freeze_batchnorm(self.net)
        if self.streams(x):
            try:
                return self._streamed_step(x, y, start)
            finally:
                close_input(x)  # a slide read by region: its file
        logits, loss = self._whole_step(x, torch.tensor([y], device=self.device), self.generator)
        if self.driver_steps:
            self.optim.add(loss)
        stepped = False if self.driver_steps else self.optim.backward(loss)
        metrics = step_metrics(self.optim, self.device, start, logits, y, loss, torch.zeros(()), loss, stepped)
        return logits.detach(), metrics

    def _whole_step(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator):
        """The whole-slide forward and loss: (logits, loss with its graph)."""
        with self._autocast():
            # The frozen stem keeps nothing for backward: run it in tiles, as stage 1 does (run_stem).
            x = run_stem(self.net.stem, x, self.device, self.bf16)
            logits, _ = self.net.head(self.net.run_blocks(x), generator)
            return logits, F.cross_entropy(wide(logits), target)

    def slide_pixels(self, x: torch.Tensor) -> int:
        """E2E takes the slide itself."""
        return x.shape[-2] * x.shape[-1]

    def probe_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The whole-slide step's loss on ``x`` with its graph (model/budget.py); nothing of the run's state moves."""
        self.net.train()
        freeze_batchnorm(self.net)
        target = torch.zeros(1, dtype=torch.long, device=self.device)
        return self._whole_step(x, target, torch.Generator().manual_seed(0))[1]

    def _stem_map(self, x: torch.Tensor | RegionInput) -> torch.Tensor | RegionInput:
        """The streamed step's stem map: held in host memory, or recomputed where read (model.stream_stem)."""
        return streamed_stem(self.net.stem, x, self.device, self.bf16, self.recompute_stem)

    def _streamed_step(self, x: torch.Tensor, y: int, start: float) -> tuple[torch.Tensor, dict]:
        """Every block tile by tile, H's first conv too, the rest of H with autograd (model/stream.py)."""
        x = self._stem_map(x)
        target = torch.tensor([y], device=self.device)
        step = streamed_step(self.net.blocks, self.net.head, x, target, self.streaming.tile_out(self.spec),
                             self.device, self._autocast, self.generator, widen=wide)
        if self.driver_steps:
            self.optim.add(step.loss, step.backward)
        stepped = False if self.driver_steps else self.optim.backward(step.loss, step.backward)
        metrics = step_metrics(self.optim, self.device, start, step.logits, y, step.loss, torch.zeros(()), step.loss,
                               stepped, streamed=True)
        return step.logits.detach(), metrics

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor):
        self.net.eval()
        if self.streams(x):  # as the slide trains: tile by tile
            try:
                _, logits, attention = streamed_evaluation(self.net.blocks, self.net.head, self._stem_map(x),
                                                           self.streaming.tile_out(self.spec), self.device,
                                                           self._autocast)
            finally:
                close_input(x)
            return logits, torch.softmax(wide(logits), 1)[0].cpu(), wide(attention).cpu()
        with self._autocast():
            # The stem in tiles, as in training: whole, its first maps hold several times the slide (run_stem).
            x = run_stem(self.net.stem, x, self.device, self.bf16)
            logits, attention = self.net.head(self.net.run_blocks(x))
        return logits, torch.softmax(wide(logits), 1)[0].cpu(), wide(attention).cpu()

    def inference_parts(self) -> tuple[nn.Module, nn.Module]:
        """(features: the stem and every block; classifier: H)."""
        return nn.Sequential(self.net.stem, self.net.blocks), self.net.head

    def state_dict(self) -> dict:
        return {"index": 0, "modules": self.net.state_dict(), "optim": self.optim.state_dict(),
                "generator": self.generator.get_state(), "rfr_clamped": 0}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["modules"])
        self.optim.load_state_dict(state["optim"])
        self.generator.set_state(state["generator"])
