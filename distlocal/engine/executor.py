"""
The executor interface the trainer, evaluation and benchmarks use, and the choice of one by train.executor.

Two executors implement it: LocalExecutor (every stage in this process: the reference numerics) and RayExecutor (a
Ray actor per stage, or per replica of a stage). Ray is imported only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from distlocal.config import Config
from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.handover import NextPass
from distlocal.engine.local import LocalExecutor
from distlocal.model import build_stages, resolve_device

__all__ = ["Executor", "make_executor"]


class Executor(Protocol):
    """What an executor does for a run; every result comes back in slide order."""

    info: list[dict]  # where each stage actor runs (node, pid, device, ...), for tags and logs; [] without actors
    transport_summary: str  # what the activation hops use (e.g. object_store, gloo, cuda_ipc,nccl), for tags

    def train(self, records: Iterable[SlideRecord], loader: SlideLoader,
              epoch: int) -> Iterator[tuple[str, list[dict]]]:
        """Train on each slide: (slide_id, one metrics dict per stage)."""

    def evaluate(self, records: Iterable[SlideRecord], loader: SlideLoader,
                 depth: int | None = None) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """
        Forward only: (slide_id, class probabilities of the classifiers of stages 1..depth); by default every stage,
        else the evaluation stops after stage ``depth`` (early exit at A_depth).
        """

    def evaluate_next(self, records: list[SlideRecord], loader: SlideLoader) -> NextPass | None:
        """
        Say that the next call is evaluate(records, loader), right after the training now under way: its slides may
        enter the pipeline while training's last slides leave it (each stage evaluates after its own last training
        step, so the results are those of evaluating afterwards). Returns the handle evaluate() consumes, or None
        from an executor without a pipeline to enter early (it ignores the call).
        """

    def attention(self, records: Iterable[SlideRecord], loader: SlideLoader,
                  depth: int | None = None) -> Iterator[tuple[str, tuple]]:
        """(slide_id, (probabilities, attention map)) of stage ``depth``'s classifier (H's by default), for heatmaps."""

    def end_epoch(self, metrics: list[float]) -> None:
        """Each stage's schedulers step on its classifier's validation metric."""

    def save_stages(self, directory: Path) -> None:
        """One file per stage into a checkpoint folder."""

    def load_stages(self, directory: Path) -> None:
        """Every stage from a checkpoint folder."""

    def state_dicts(self) -> list[dict]:
        """Each stage's state, on the CPU."""

    def stats(self) -> list[dict]:
        """Each stage's counters: optimizer steps, RFR patches clamped."""

    def recover(self, directory: Path) -> None:
        """After a StageFailure: bring every stage back (restarted actors) and reload it from `directory`."""

    def close(self) -> None:
        """Release what the executor holds (actors, placement groups)."""


def make_executor(cfg: Config, num_classes: int) -> Executor:
    """LocalExecutor (all stages in this process) or RayExecutor (one actor per stage)."""
    if cfg.train.executor == "ray":
        from distlocal.engine.ray_executor import RayExecutor

        return RayExecutor(cfg, num_classes)
    return LocalExecutor(build_stages(cfg, num_classes, resolve_device(cfg.train.device)))
