"""
What the executors (and predict) rely on in a trainable stage: the interface Stage and EndToEnd share.

A Protocol, so a stand-in in a test needs no base class; Stage and EndToEnd subclass it to say that they implement
it, and share end_epoch, which is the same in both.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from distlocal.model.backbone import StageSpec
from distlocal.model.optim import LocalOptimizer
from distlocal.model.stream import Streaming

__all__ = ["StageInterface"]


class StageInterface(Protocol):
    """One trainable unit of the pipeline: a Stage (F_i + A_i (+ U_i)), or EndToEnd (the whole network + H)."""

    spec: StageSpec
    device: torch.device
    is_last: bool  # sends no activation onwards
    optim: LocalOptimizer
    bf16: bool
    # Set from outside by a replica's actor: the driver decides when the window steps (optim.step with a reduce).
    driver_steps: bool
    rfr_clamped: int  # slides whose maps were smaller than the RFR patch (always 0 without RFR)
    streaming: Streaming | None  # model.stream: when and in which tiles a slide runs streamed; None: never

    def train_step(self, x: torch.Tensor, y: int, slide: tuple[int, str] | None = None) -> tuple[torch.Tensor, dict]:
        """Forward, local loss, backward (and step when the window fills); (detached output, metrics)."""

    def eval_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward only: (output, class probabilities, attention map on the CPU)."""

    def inference_parts(self) -> tuple[nn.Module, nn.Module]:
        """(feature extractor, classifier) for prediction: what to run of this stage on a whole slide."""

    def state_dict(self) -> dict:
        """Modules, optimizer, generator and counters: one checkpoint file."""

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict."""

    def slide_pixels(self, x: torch.Tensor) -> int:
        """The slide pixels behind an input of this stage (what model.stream=auto decides on)."""

    def streams(self, x: torch.Tensor) -> bool:
        """Whether the slide behind ``x`` trains (and is evaluated) tile by tile; shared by Stage and EndToEnd."""
        return self.streaming is not None and self.streaming.streams(self.slide_pixels(x))

    def end_epoch(self, metric: float) -> None:
        """Feed this stage's own validation metric to its lr schedule (train.schedule)."""
        self.optim.end_epoch(metric)
