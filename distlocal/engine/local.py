"""
The local executor: all stages in one process on one device, one slide at a time.

This is the reference numerics; the Ray executor with one slide in flight must reproduce it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.checkpoint import stage_file
from distlocal.model import StageInterface
from distlocal.slides import SlideError

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Moves each slide's detached activations from stage to stage; the stages do the learning."""

    def __init__(self, stages: list[StageInterface]):
        self.stages = stages
        self.info: list[dict] = []  # no actors: every stage runs here, on its own device
        self.transport_summary = "in_process"  # activations are handed over in memory

    def train(self, records: Iterable[SlideRecord], loader: SlideLoader,
              epoch: int) -> Iterator[tuple[str, list[dict]]]:
        """For each slide, in order, (slide_id, one metrics dict per stage); loading runs ahead in threads."""
        def step(record: SlideRecord, x) -> list[dict]:
            metrics = []
            for stage in self.stages:
                x, m = stage.train_step(x, record.label, (epoch, record.slide_id))
                metrics.append(m)
            return metrics

        return _each_read(records, loader, epoch, step)

    def evaluate(self, records: Iterable[SlideRecord], loader: SlideLoader,
                 depth: int | None = None) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """For each slide (slide_id, class probabilities of stage 1..depth's classifiers), forward only."""
        def forward(record: SlideRecord, x) -> list[torch.Tensor]:
            probs = []
            for stage in self.stages[:depth]:
                x, p, _ = stage.eval_step(x)
                probs.append(p)
            return probs

        return _each_read(records, loader, 0, forward)

    def evaluate_next(self, records: list[SlideRecord], loader: SlideLoader) -> None:
        """One process runs one slide at a time: there is no pipeline for the next phase to enter early."""

    def attention(self, records: Iterable[SlideRecord], loader: SlideLoader,
                  depth: int | None = None) -> Iterator[tuple[str, tuple]]:
        """Each slide's (slide_id, (probabilities, attention map)) of stage ``depth``'s classifier (H's by default)."""
        def attend(record: SlideRecord, x) -> tuple:
            for stage in self.stages[:depth]:
                x, probs, attention = stage.eval_step(x)
            return probs, attention

        return _each_read(records, loader, 0, attend)

    def end_epoch(self, metrics: list[float]) -> None:
        for stage, metric in zip(self.stages, metrics, strict=True):
            stage.end_epoch(metric)

    def state_dicts(self) -> list[dict]:
        return [stage.state_dict() for stage in self.stages]

    def load_state_dicts(self, states: list[dict]) -> None:
        for stage, state in zip(self.stages, states, strict=True):
            stage.load_state_dict(state)

    def save_stages(self, directory: Path) -> None:
        """Write one file per stage into a checkpoint folder, as the Ray actors do."""
        for i, stage in enumerate(self.stages):
            torch.save(stage.state_dict(), stage_file(directory, i))

    def load_stages(self, directory: Path) -> None:
        for i, stage in enumerate(self.stages):
            stage.load_state_dict(torch.load(stage_file(directory, i), map_location="cpu", weights_only=True))

    def stats(self) -> list[dict]:
        return [{"steps": s.optim.steps, "rfr_clamped": s.rfr_clamped} for s in self.stages]

    def recover(self, directory: Path) -> None:
        """Nothing restarts in one process: every stage reloads the checkpoint."""
        self.load_stages(directory)

    def close(self) -> None:
        """Nothing to release in one process; the Ray executor stops its actors here."""


def _each_read(records: Iterable[SlideRecord], loader: SlideLoader, epoch: int,
               run: Callable[[SlideRecord, object], object]) -> Iterator[tuple[str, object]]:
    """
    (slide_id, run(record, input)) for each slide the loader reads, in order. Read by region (model.stream), a
    damaged tile shows only when stage 1 reads it, before any stage learns (engine/unread.py): ``loader.skip``
    reports the slide, or raises under data.on_error=fail.
    """
    for record, x in loader.stream(records, epoch):
        try:
            result = run(record, x)
        except SlideError as exc:
            loader.skip(record, exc)
            continue
        yield record.slide_id, result
