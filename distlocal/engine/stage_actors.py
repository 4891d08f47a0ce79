"""
Starting the stage actors: one per replica of each stage, each in its own bundle of the run's placement group, and
the checks that they can work together (they all see run.dir) before the first slide.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distlocal.config import Config
from distlocal.engine.faults import ClusterError
from distlocal.engine.placement import bundle_order, place_stages
from distlocal.engine.remote import call_all

__all__ = ["StageActors", "write_marker"]

log = logging.getLogger(__name__)


class StageActors:
    """
    The actors of a run, stage by stage (replicas of a stage side by side), and the placement group that holds
    them. `config` is the run's config as a dict with the driver's absolute run.dir (every actor builds from it).
    """

    def __init__(self, cfg: Config, config: dict, num_classes: int, actor_cls: type, counts: list[int]):
        self.cfg, self.config, self.num_classes, self.actor_cls = cfg, config, num_classes, actor_cls
        self.counts = counts  # replicas per stage
        self.replicated = max(counts) > 1
        self.placement = None  # the placement group: one bundle per actor
        self.all: list = []  # every actor, stage by stage
        self.stages: list[list] = []  # stage -> its replicas
        self.bundles: list[int] = []  # the placement bundle of each actor, in the order of `all`
        self.info: list[dict] = []  # each actor's info(): where it runs

    def place(self) -> None:
        """Reserve one bundle per actor (placement.py fails with what the cluster has if that cannot be)."""
        self.placement, self.cpus, self.gpus = place_stages(self.cfg.train, sum(self.counts), self.replicated)

    def start(self) -> None:
        """One actor per replica, each in its own bundle (flat index: stage by stage); info() once they are up."""
        # Direct hops choose their transport per call (.options(tensor_transport)), which the class must allow.
        remote_cls = ray.remote(enable_tensor_transport=self.cfg.train.transport != "object_store")(self.actor_cls)
        # A restarted replica is not in its group: replicas are never restarted by Ray, the executor starts the
        # whole pipeline afresh instead (ReplicaDriver.restart).
        restarts = 0 if self.replicated else self.cfg.train.max_restarts
        self.all, self.stages = [], []
        # Neighbouring stages on one node; the loaders take the same order (stage 1's bundles first).
        self.bundles = bundles = bundle_order(self.placement)
        for i, count in enumerate(self.counts):
            self.stages.append([remote_cls.options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement, placement_group_bundle_index=bundles[len(self.all) + r]),
            ).remote(self.config, self.num_classes, i, r, count) for r in range(count)])
            self.all += self.stages[-1]

    def call(self, method: str, *args, what: str, actors: list | None = None, timeout_s: float | None = None) -> list:
        """`method` on every actor (or on `actors`), at once; their results in order (within `timeout_s`, if given)."""
        return call_all(self.all if actors is None else actors, method, *args, what=what, timeout_s=timeout_s)

    def refresh_info(self, what: str, timeout_s: float | None = None) -> None:
        self.info = self.call("info", what=what, timeout_s=timeout_s)

    def firsts(self) -> list:
        """Rank 0 of every stage: after pooling it holds its stage's whole state."""
        return [replicas[0] for replicas in self.stages]

    def info_of(self, actor) -> dict:
        return self.info[self.all.index(actor)]

    def check_shared_run_dir(self, run_dir: Path, marker: Path, token: str) -> None:
        """Every actor must see the driver's run.dir: checkpoints are written by the actors, read by all."""
        seen = self.call("sees", str(run_dir), marker.name, token, what=f"checking that the stages see {run_dir}")
        blind = [info for info, ok in zip(self.info, seen, strict=True) if not ok]
        if blind:
            where = ", ".join(f"stage {i['stage']} on node {i['node']} ({i['node_id'][:12]})" for i in blind)
            raise ClusterError(
                f"run.dir {run_dir} is not shared: {where} cannot see the file the driver wrote there, so "
                f"checkpoints would scatter over the nodes' own disks; put run.dir on storage every node mounts at "
                f"the same path (NFS, a cluster file system) and pass it as an absolute path")

    def log_where(self) -> None:
        for info in self.info:
            count = self.counts[info["stage"] - 1]
            where = f"stage {info['stage']}" + (f" replica {info['replica'] + 1}/{count}" if count > 1 else "")
            log.info("%s on %s (node %s, pid %d): %s (%s), GPU ids %s, activations %s", where, info["node"],
                     info["node_id"][:12], info["pid"], info["device"], info["device_name"], info["gpu_ids"] or "-",
                     info["activation_dtype"])

    def kill(self) -> None:
        for actor in self.all:
            ray.kill(actor, no_restart=True)

    def release_placement(self) -> None:
        """Free the placement group (a sweep's next child needs its GPUs)."""
        if self.placement is not None:
            remove_placement_group(self.placement)


def write_marker(run_dir: Path) -> tuple[Path, str]:
    """A file in run.dir that every stage actor must find (StageActors.check_shared_run_dir)."""
    token = secrets.token_hex(8)
    marker = run_dir / f".distlocal-shared-{token}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as exc:  # e.g. evaluating a cluster's checkpoint where its /shared/runs does not exist
        raise ClusterError(f"cannot write to run.dir {run_dir} ({exc}); the stages keep their checkpoints "
                           f"there: set run.dir to a folder on storage every node shares") from None
    return marker, token
