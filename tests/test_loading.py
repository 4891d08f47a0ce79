"""Slide loading in the Ray executor: one loader process for the whole run, so no phase starts cold."""

from __future__ import annotations

import time

import ray

from distlocal.config import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.ray_executor import RayExecutor
from tests.harness import leftover_processes


def _ray_workers() -> set[int]:
    """Pids of the Ray worker processes (`ray::...`) this test run has started."""
    return {pid for pid, command in leftover_processes().items() if command.startswith("ray::")}


def test_a_later_phase_starts_no_new_worker_process(no_shared_ray, manifest, tmp_path):
    """
    On a node with as many CPUs as stages, Ray reaps idle task workers after a second: loads as tasks started fresh
    workers (importing torch) for every phase. The second phase must run its loads in the processes already there.
    """
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"run.dir={tmp_path}", "train.device=cpu", "train.executor=ray",
        "model.backbone=resnet18", "model.k=2", "model.split=balanced", "train.epochs=1", "train.accumulate=2",
        "model.rfr.patch_size=16", "tracking.enabled=false", "train.placement_timeout_s=60"])
    records = read_manifest(cfg.data.manifest)
    executor = RayExecutor(cfg, 2)
    try:
        trained = [s for s, _ in executor.train(records.split("train"), SlideLoader(cfg.data, True, 0), 0)]
        first = executor.feed.trace()
        time.sleep(3)  # past Ray's idle-worker reaping (1 s): a task worker would be gone by now
        before = _ray_workers()
        validated = [s for s, _ in executor.evaluate(records.split("valid"), SlideLoader(cfg.data, False))]
        second = executor.feed.trace()
        started = _ray_workers() - before
    finally:
        executor.close()
    assert trained == [r.slide_id for r in records.split("train")]
    assert validated == [r.slide_id for r in records.split("valid")]
    assert not started, f"the second phase started worker processes {started}"
    assert sorted(s for s, *_ in first["loads"]) == sorted(trained)  # every load ran in the loader actor
    assert sorted(s for s, *_ in second["loads"]) == sorted(validated)
    assert {pid for _, pid, *_ in first["loads"] + second["loads"]} == {first["pid"]} == {second["pid"]}
