"""
The driver's side of replicated stages (train.replicas): which replica of each stage a slide goes to, when the
replicas step, their torch groups, pooling an open window before a save, and starting them afresh after a failure.

With every stage at one replica this object only routes (each stage's one actor); the executor calls it the same
way either way. The actors' side (the all-reduce itself) is engine/replicas.py.
"""

from __future__ import annotations

import ray

from distlocal.engine.faults import ClusterError
from distlocal.engine.recovery import restart_config
from distlocal.engine.remote import fetch
from distlocal.engine.replicas import Schedule
from distlocal.engine.stage_actors import StageActors

__all__ = ["ReplicaDriver"]


class ReplicaDriver:
    """Routes slides to replicas and steps them window by window; a replicated stage's replicas stay equal."""

    def __init__(self, actors: StageActors, accumulate: int):
        self.actors = actors
        self.active = actors.replicated  # some stage has more than one replica
        self.schedule = Schedule(actors.counts, accumulate)
        self.generation = 0  # of the replica groups: a group rebuilt after a failure never meets an old rank
        self.windows_stepped = 0
        self.pending_steps: list = []  # refs of optimizer steps issued and not yet fetched

    def route(self, training: bool, n: int) -> tuple[list, bool]:
        """The actor of each stage for the n-th slide of a pass, and whether a training window closes after it."""
        if not training:  # replicas are equal: forward passes go to them in turn
            return [replicas[n % len(replicas)] for replicas in self.actors.stages], False
        route = self.schedule.next()
        return [replicas[r] for replicas, r in zip(self.actors.stages, route.replicas, strict=True)], route.closes

    def step_window(self) -> None:
        """Every replica of every replicated stage steps: each actor's queue already holds the window's slides."""
        if not self.active:  # a stage of one replica steps by itself when its window fills
            return
        self.windows_stepped += 1
        self.pending_steps += [a.step.remote(self.windows_stepped) for replicas in self._replicated() for a in replicas]

    def wait(self, refs: list, what: str):
        """
        The results of `refs`, watching the pending steps meanwhile: a replica stuck in an all-reduce with a dead
        partner would otherwise hide the death until the collective's timeout.
        """
        while self.pending_steps:
            done, self.pending_steps = ray.wait(self.pending_steps, num_returns=len(self.pending_steps), timeout=0)
            fetch(done, "stepping the replicas")
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            if len(ready) == len(refs):
                break
        return fetch(refs, what)

    def drain(self) -> None:
        """Wait for every step issued (a pass's end, a save, a load)."""
        steps, self.pending_steps = self.pending_steps, []
        fetch(steps, "stepping the replicas")

    def resume_at(self, filled: int) -> None:
        """Routing continues at the checkpoint's window fill, so resume and replay route as the first pass did."""
        self.schedule.filled = filled

    def form_groups(self) -> None:
        """A torch process group per replicated stage, under a new generation number."""
        self.generation += 1
        for i, replicas in enumerate(self.actors.stages):
            if len(replicas) == 1:
                continue
            where = [(info["node_id"], tuple(info["gpu_ids"])) for info in self.actors.info if info["stage"] == i + 1]
            if self.actors.info_of(replicas[0])["device"].startswith("cuda") and len(set(where)) < len(where):
                raise ClusterError(
                    f"the {len(replicas)} replicas of stage {i + 1} share GPUs ({[list(w[1]) for w in where]}), but "
                    f"NCCL takes one rank per GPU; give each replica a whole GPU (train.gpus_per_stage=1) or lower "
                    f"train.replicas={self.actors.cfg.train.replicas}")
            wait = self.actors.cfg.train.collective_timeout_s
            address = fetch(replicas[0].host_replica_group.remote(), f"hosting stage {i + 1}'s replica group", wait)
            fetch([a.join_replica_group.remote(address, self.generation) for a in replicas],
                  f"forming stage {i + 1}'s replica group (train.collective_timeout_s)", wait)

    def pool(self) -> None:
        """
        Gather each replicated stage's open window on rank 0 and check that its replicas are equal: rank 0's state
        is then one stage's state, the file one stage would write.
        """
        replicated = self._replicated()
        if not replicated:
            return
        self.drain()
        fetch([a.pool.remote() for replicas in replicated for a in replicas], "pooling the replicas' gradients")
        for replicas in replicated:
            prints = self.actors.call("fingerprint", what="comparing the replicas", actors=replicas)
            if len(set(prints)) > 1:
                stage = self.actors.stages.index(replicas) + 1
                raise RuntimeError(f"the replicas of stage {stage} differ ({prints}); their steps were not the same "
                                   f"all-reduced update: this is a bug, please report it")

    def restart(self) -> None:
        """
        A dead replica broke its group, and a survivor may wait in an all-reduce: end every actor, start fresh ones
        in the same bundles and form the groups under a new generation (the caller then reloads a checkpoint).
        """
        self.pending_steps = []
        self.actors.kill()
        self.actors.config = restart_config(self.actors.config)  # the checkpoint is loaded next: no weights to fetch
        self.actors.start()
        self.actors.refresh_info("restarting the stage actors (train.recovery_timeout_s)",
                                 self.actors.cfg.train.recovery_timeout_s)
        self.form_groups()

    def _replicated(self) -> list[list]:
        return [replicas for replicas in self.actors.stages if len(replicas) > 1]
