"""Faults injected into a training run (a crash, a lost node, a stage that raises): shared by the fault tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["OutOfMemoryOnArrival", "failing_actor", "fit_and_interrupt", "slowed"]


def fit_and_interrupt(trainer, run_dir: Path, lines: int, interrupt: Callable[[], None]) -> dict:
    """
    Run trainer.fit() in a thread; once metrics.jsonl holds `lines` lines, call `interrupt` (kill an actor, remove
    a node); return {"summary": ...} or {"error": ...}.
    """
    outcome: dict = {}

    def fit():
        try:
            outcome["summary"] = trainer.fit()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)  # a hung run must not keep pytest from exiting
    thread.start()
    metrics, deadline = Path(run_dir) / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    interrupt()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not end within 300 s of the interruption"
    return outcome


def failing_actor(stage: int, error: BaseException, slides: set[str] | None = None) -> type:
    """
    A StageActor whose Stage raises `error` in the training steps of stage `stage` (0-based): on every slide, or on
    the slides `slides` only (so one executor can serve a test of the failure and tests of normal work).
    """
    import ray

    from distlocal.engine.actor import StageActor

    class Failing(StageActor):
        def __init__(self, cfg, num_classes, index, *replica):  # replica: (rank, size) of a replicated stage
            super().__init__(cfg, num_classes, index, *replica)
            self.slide_id = None
            if index == stage:
                step = self.stage.train_step

                def fail(x, y, slide=None):
                    if slides is None or self.slide_id in slides:
                        raise error
                    return step(x, y, slide)

                self.stage.train_step = fail

        @ray.method(num_returns=2)  # as the method it overrides: (activation, metrics)
        def train_step(self, x, y, slide_id, epoch=None):
            self.slide_id = slide_id
            return super().train_step(x, y, slide_id, epoch)

    return Failing


def _out_of_memory(message: str):
    import torch

    raise torch.OutOfMemoryError(message)


class OutOfMemoryOnArrival:
    """An argument whose unpickling runs out of memory, as a GPU tensor deserialized onto a full cuda:0 does."""

    def __init__(self, message: str):
        self.message = message

    def __reduce__(self):
        return _out_of_memory, (self.message,)


def slowed(task: Callable, seconds: float) -> Callable:
    """`task` that first waits `seconds`: a cluster test can then remove a node while work is under way there."""

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return task(*args, **kwargs)

    return slow
