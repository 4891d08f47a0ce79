"""
Slide loading for the Ray executor: long-lived loader actors (train.loaders of them), beside stage 1.

Loads used to be Ray tasks. Ray reaps an idle task worker after a second once a node has more workers than CPUs
(actors count), so on a small node every phase (each epoch, each validation, the test) started its loaders afresh,
and each fresh worker imported torch and the model stack before its first slide: 35-46 s of a phase's start on a
2-core machine. An actor lives for the whole run and imports only what loading needs (this module: no torchvision,
no model code). Decoding (tifffile / imagecodecs) releases the GIL, so the actor loads `data.prefetch` slides at
once in threads; it runs in stage 1's placement-group bundle, so a slide is already on stage 1's node.

One loader reads ~3 cached slides/s on a small VM while a GPU stage steps tens per second: `train.loaders` runs
several, placed in stage 1's bundles first (its replicas' nodes), then in the other stages' bundles (other nodes).
Slide i of a pass goes to loader i mod N and the driver hands them to stage 1 in the records' order, so what stage 1
sees does not depend on N. The tensors go from a loader to stage 1 as ObjectRefs: never through the driver. A lost
loader (its node gone) is restarted by Ray like a stage actor and its loads in flight are retried.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distlocal.config import DataConfig
from distlocal.data import SlideLoader, SlideRecord
from distlocal.data.loader import SkippedSlide
from distlocal.slides import SlideError

__all__ = ["SlideFeed", "SlideLoaderActor", "absolute_cache_dir"]

log = logging.getLogger(__name__)


def absolute_cache_dir(cfg: DataConfig) -> DataConfig:
    """
    The loader actor runs in its node's copy of the job's working_dir: a relative data.cache_dir would be looked up
    there, miss, and every slide would be decoded from the original each epoch. The driver's absolute path it is.
    """
    if not cfg.cache_dir or Path(cfg.cache_dir).is_absolute():
        return cfg
    return dataclasses.replace(cfg, cache_dir=str(Path(cfg.cache_dir).resolve()))


class SlideLoaderActor:
    """Reads, augments and normalises slides for the pipeline; one instance serves the whole run."""

    def __init__(self):
        # Ray sets OMP_NUM_THREADS=1 in an actor of num_cpus=0: normalising a gigapixel slide would use one core.
        # It shares stage 1's node; past a few threads the normalisation is bound by memory, not cores.
        torch.set_num_threads(min(os.cpu_count() or 1, 8))
        self.started = time.time()
        self.loads: list[tuple[str, int, float, float]] = []  # (slide_id, pid, start, end): the trace tests read

    @ray.method(num_returns=2)
    def load(self, cfg: DataConfig, train: bool, seed: int, record: SlideRecord, epoch: int, by_region: bool = False):
        """
        (slide tensor, None), or (None, the problem) for a bad slide under data.on_error=skip. ``by_region``
        (model.stream): SlideRegions instead of the tensor, small: stage 1's actor reads the regions itself.
        """
        start = time.time()
        try:
            return SlideLoader(cfg, train, seed, by_region).load(record, epoch), None
        except SlideError as exc:
            if cfg.on_error == "fail":
                raise
            return None, str(exc)
        finally:
            self.loads.append((record.slide_id, os.getpid(), start, time.time()))

    def pop_trace(self) -> dict:
        """The process's start time and the loads it ran since the last call."""
        loads, self.loads = self.loads, []
        return {"pid": os.getpid(), "started": self.started, "loads": loads, "threads": torch.get_num_threads(),
                "node_id": ray.get_runtime_context().get_node_id()}


class SlideFeed:
    """The driver's side: submits loads ahead of the pipeline and yields (record, ObjectRef of the tensor)."""

    def __init__(self, cfg: DataConfig, placement: PlacementGroup, fetch, loaders: int = 1,
                 bundles: list[int] | None = None):
        """`bundles`: the placement group's bundles in the order loaders take them (stage 1's first)."""
        bundles = bundles or [0]
        # num_cpus=0: the stages' placement group may hold every CPU of the node, and a loader waiting for a CPU
        # would stall the pipeline for ever; the driver bounds the loads in flight instead.
        self.actors = [ray.remote(SlideLoaderActor).options(
            num_cpus=0, max_concurrency=max(1, cfg.prefetch), max_restarts=-1, max_task_retries=2,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement, placement_group_bundle_index=bundles[j % len(bundles)]),
        ).remote() for j in range(loaders)]
        self.fetch = fetch  # the executor's ray.get, which names the failure

    def slides(self, records: Iterable[SlideRecord], loader: SlideLoader, epoch: int,
               ahead: int) -> Iterator[tuple[SlideRecord, ray.ObjectRef]]:
        """(record, ObjectRef of its tensor) in order, with `ahead` loads submitted before the first is needed."""
        pending: deque = deque()
        it = enumerate(records)
        cfg = absolute_cache_dir(loader.cfg)

        def submit() -> None:
            i, record = next(it, (0, None))
            if record is not None:
                actor = self.actors[i % len(self.actors)]
                pending.append((record, *actor.load.remote(cfg, loader.train, loader.seed, record, epoch,
                                                           loader.by_region)))

        for _ in range(ahead):
            submit()
        while pending:
            record, x, problem = pending.popleft()
            problem = self.fetch(problem, f"loading slide {record.slide_id}")
            submit()
            if problem is not None:
                log.warning("skipping slide %s: %s", record.slide_id, problem)
                loader.skipped.append(SkippedSlide(record.slide_id, str(record.path), problem))
                continue
            yield record, x

    def trace(self) -> dict:
        """The first loader's trace (pop_trace)."""
        return self.traces()[0]

    def traces(self) -> list[dict]:
        """Each loader's trace (pop_trace), with the node it runs on."""
        return self.fetch([a.pop_trace.remote() for a in self.actors], "collecting the slide loaders' traces")

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
