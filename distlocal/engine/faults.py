"""Errors of a distributed run, importable without Ray (the trainer catches them whichever executor runs)."""

from __future__ import annotations

__all__ = ["ClusterError", "RunFailed", "StageFailure"]


class ClusterError(RuntimeError):
    """The cluster cannot run the stages as configured; the message says what was asked, what exists, the fix."""


class StageFailure(RuntimeError):
    """A stage actor died (process killed, node lost); the trainer restarts from the last checkpoint."""


class RunFailed(RuntimeError):
    """Stages kept failing beyond train.max_restarts; the last good checkpoint is intact."""
