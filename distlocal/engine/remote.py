"""
Fetching results from the stage actors: ray.get that turns Ray's errors into the run's own.

A dead actor (or a lost object, a crashed worker, a broken replica group) becomes StageFailure, which the trainer
recovers from; a stage's own error (a bad slide, out of memory) is raised as itself, from the stage that raised it,
and an out-of-memory before the stage's code ran (deserializing its input) is named by the stage. A bounded wait
(a restart, a group forming) that runs out is a ClusterError naming what it waited for.
"""

from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from distlocal.engine.faults import ClusterError, GroupFailure, InputFailed, StageFailure, unplaced_out_of_memory

__all__ = ["call_all", "fetch"]


def fetch(refs, what: str, timeout_s: float | None = None):
    """
    ray.get that turns a dead actor into StageFailure and a task's own error into that error; no answer within
    `timeout_s` (None: wait for ever) is a ClusterError naming `what`.
    """
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise ClusterError(f"{what}: no answer within {timeout_s:g} s") from None
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, InputFailed) and isinstance(refs, list):  # the stage whose error it is, not a later one
            cause = _first_error(refs) or cause
        if (oom := unplaced_out_of_memory(cause, exc, what)) is not None:  # before the stage's own code ran
            raise oom from None
        if isinstance(cause, RayError | GroupFailure):
            raise StageFailure(f"{what}: {cause}") from None
        raise cause from None
    except RayError as exc:  # RayActorError, ObjectLostError, OwnerDiedError, WorkerCrashedError, ...
        raise StageFailure(f"{what}: {type(exc).__name__}: {exc}") from None


def call_all(actors: list, method: str, *args, what: str, timeout_s: float | None = None) -> list:
    """Call `method` on every actor at once; their results in order (fetch names `what` on a failure)."""
    return fetch([getattr(a, method).remote(*args) for a in actors], what, timeout_s)


def _first_error(refs: list) -> BaseException | None:
    """The error of the earliest stage that failed on its own (a slide's refs are in stage order)."""
    for ref in refs:
        try:
            ray.get(ref)
        except RayTaskError as exc:
            if not isinstance(exc.cause, InputFailed):
                return exc.cause
        except RayError as exc:
            return exc
    return None
