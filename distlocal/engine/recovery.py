"""
Recovery after a StageFailure: wait until Ray has restarted every dead stage actor (train.max_restarts), or say
that one will not come back. The executor then reloads the checkpoint and chooses the hops again.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from distlocal.engine.faults import ClusterError

__all__ = ["await_restarts", "restart_config"]


def await_restarts(actors: list, timeout_s: float, max_restarts: int) -> None:
    """Return once every actor answers a ping; ClusterError naming the stage if one does not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for i, actor in enumerate(actors):
        while True:  # a restarting actor queues the ping; one that is dead for good keeps failing it
            try:
                ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except (RayActorError, GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"stage {i + 1} did not come back within {timeout_s:g} s ({type(exc).__name__}; "
                        f"train.recovery_timeout_s); Ray restarts an actor at most train.max_restarts={max_restarts} "
                        f"times"
                    ) from None
                time.sleep(0.5)


def restart_config(cfg: dict) -> dict:
    """
    The config of a stage started again after a failure: the checkpoint it loads next holds every weight, so it
    builds without ImageNet weights or model.weights (a replacement node may have no internet, nor that file).
    """
    model = {**cfg["model"], "pretrained": "none", "weights": ""}
    return {**cfg, "model": model}
