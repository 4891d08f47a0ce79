"""Interrupting a training run from outside, as a crash or a lost node would: shared by the fault tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["fit_and_interrupt"]


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
