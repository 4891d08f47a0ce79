"""
Replicas of a stage (pipeline x data parallelism): which replica trains which slide, and the all-reduce that makes
R replicas of a stage learn what one stage learns from the same slides.

The driver routes and decides when a window steps (`Schedule`, driven by replica_driver.py); each replica actor
holds a `ReplicaGroup`, a torch process group of its stage's replicas built directly over a TCPStore that rank 0
hosts. Not init_process_group: Ray's gloo tensor transport already owns the default group of these processes. A
window's step is issued to every replica right after the window's last slide is submitted: actor queues are FIFO, so
every slide of the window is trained before the step, and no replica waits in the all-reduce for a slide the driver
has not sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

__all__ = ["ReplicaGroup", "Route", "Schedule", "reduce_flat"]


@dataclass(frozen=True)
class Route:
    replicas: tuple[int, ...]  # for each stage, the replica that trains the slide
    closes: bool  # the slide is the last of its window: every replicated stage steps after it


class Schedule:
    """
    Slides go to the replicas of each stage in turn within an optimizer window (position in window mod R), so a
    window of A slides gives each replica ceil(A/R) or fewer. A pure function of the window's fill, which the
    checkpoint holds (the stage's `accumulated`): resume and replay route as the first pass did.
    """

    def __init__(self, replicas: list[int], accumulate: int, filled: int = 0):
        self.replicas, self.accumulate, self.filled = list(replicas), accumulate, filled

    def next(self) -> Route:
        """The route of the next trained slide."""
        position = self.filled
        self.filled = (self.filled + 1) % self.accumulate
        return Route(tuple(position % r for r in self.replicas), self.filled == 0)


def reduce_flat(grads: list[torch.Tensor | None], params: list[torch.Tensor], count: int,
                all_reduce) -> tuple[list[torch.Tensor | None], int]:
    """
    Sum `grads` and `count` over a group in one all-reduce of one flat tensor: the gradients (zeros where this
    replica has none, e.g. it trained no slide of the window), one flag per parameter, and the count. A parameter
    no replica has a gradient for comes back as None, so AdamW does not decay a weight that one stage would not
    have stepped.
    """
    parts = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    flags = [float(g is not None) for g in grads] + [float(count)]
    flat = torch.cat([*parts, torch.tensor(flags, dtype=parts[0].dtype, device=parts[0].device)])
    all_reduce(flat)
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p).clone())
        offset += p.numel()
    summed_flags = flat[offset:].tolist()
    return [g if summed_flags[i] > 0 else None for i, g in enumerate(out)], round(summed_flags[-1])


class ReplicaGroup:
    """
    One rank of a stage's data-parallel group. Rank 0 hosts the TCPStore (`host_store`), every rank then joins
    with the same generation: a group rebuilt after a failure never meets a rank of the old one.
    """

    def __init__(self, rank: int, size: int, address: tuple[str, int], generation: int, backend: str,
                 timeout_s: float, store=None):
        from torch.distributed import PrefixStore, TCPStore

        timeout = timedelta(seconds=timeout_s)
        self.rank, self.size, self.backend = rank, size, backend
        self.store = store or TCPStore(address[0], address[1], size, False, timeout)
        prefixed = PrefixStore(f"generation{generation}", self.store)
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.process_group = ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            from torch.distributed import ProcessGroupGloo

            self.process_group = ProcessGroupGloo(prefixed, rank, size, timeout)

    @staticmethod
    def host_store(host: str, size: int, timeout_s: float):
        """Rank 0's TCPStore on a free port; returns (store, port)."""
        from torch.distributed import TCPStore

        store = TCPStore(host, 0, size, True, timedelta(seconds=timeout_s), wait_for_workers=False)
        return store, store.port

    def all_reduce(self, flat: torch.Tensor) -> None:
        from torch.distributed import ReduceOp

        self.process_group.allreduce([flat], ReduceOp.SUM).wait()  # wait() raises after the group's timeout

    def reduce_params(self, params: list[torch.Tensor]):
        """A Reduce (model/optim.py) over this group for `params`: zeros stand in for missing gradients."""
        return lambda grads, count: reduce_flat(grads, params, count, self.all_reduce)
