"""
The local executor: all stages in one process on one device, one slide at a time.

This is the reference numerics; the Ray executor with one slide in flight must reproduce it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from distlocal.model import EndToEnd, Stage

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Moves each slide's detached activations from stage to stage; the stages do the learning."""

    def __init__(self, stages: list[Stage | EndToEnd]):
        self.stages = stages

    def train(self, slides: Iterable[tuple[str, torch.Tensor, int]]) -> Iterator[tuple[str, list[dict]]]:
        """For each (slide_id, x, label) yield (slide_id, one metrics dict per stage)."""
        for slide_id, x, y in slides:
            metrics = []
            for stage in self.stages:
                x, m = stage.train_step(x, y)
                metrics.append(m)
            yield slide_id, metrics

    def evaluate(self, slides: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """For each (slide_id, x) yield (slide_id, class probabilities of every stage's classifier)."""
        for slide_id, x in slides:
            probs = []
            for stage in self.stages:
                x, p, _ = stage.eval_step(x)
                probs.append(p)
            yield slide_id, probs

    def end_epoch(self, metrics: list[float]) -> None:
        for stage, metric in zip(self.stages, metrics, strict=True):
            stage.end_epoch(metric)

    def state_dicts(self) -> list[dict]:
        return [stage.state_dict() for stage in self.stages]

    def load_state_dicts(self, states: list[dict]) -> None:
        for stage, state in zip(self.stages, states, strict=True):
            stage.load_state_dict(state)

    def close(self) -> None:
        """Nothing to release in one process; the Ray executor stops its actors here."""
