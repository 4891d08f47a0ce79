"""Slide loading in the Ray executor: one loader process for the whole run, so no phase starts cold."""

from __future__ import annotations

import os

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from distlocal.bench.whole_run import bench_whole_run, format_whole_run
from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.loading import SlideFeed
from distlocal.engine.ray_executor import RayExecutor
from distlocal.slides import SlideImage
from distlocal.slides.cache import cache_key, write_cached
from tests.harness import leftover_processes


def _ray_workers() -> set[int]:
    """Pids of the Ray worker processes (`ray::...`) this test run has started."""
    return {pid for pid, command in leftover_processes().items() if command.startswith("ray::")}


def test_no_phase_of_a_run_starts_a_worker_process(no_shared_ray, manifest, tmp_path):
    """
    On a node with as many CPUs as stages, Ray reaps idle task workers after a second: loads as tasks started fresh
    workers (each importing torch) in every phase. A whole run (train, validation, test) must load in the processes
    that were there when it started, all in the loader actor; the whole-run benchmark reports each phase's wait.
    """
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"run.dir={tmp_path}", "train.device=cpu", "train.executor=ray",
        "model.backbone=resnet18", "model.k=2", "model.split=balanced", "train.accumulate=2",
        "model.rfr.patch_size=16", "tracking.enabled=false", "train.placement_timeout_s=60"])
    executor = RayExecutor(cfg, 2)
    try:
        loader_pid = executor.feed.trace()["pid"]  # the loader is up
        before = _ray_workers()
        result = bench_whole_run(cfg, tmp_path / "bench", 1, executor)
        started = _ray_workers() - before
    finally:
        executor.close()
    assert not started, f"the run started worker processes {started}"
    assert result["loader_pids"] == [loader_pid]  # every load of every phase
    records = read_manifest(manifest)
    assert [(p["phase"], p["slides"]) for p in result["phases"]] == [
        ("epoch 1 train", len(records.split("train"))), ("epoch 1 valid", len(records.split("valid"))),
        ("test", len(records.split("test")))]
    for phase in result["phases"]:
        assert 0 < phase["own_step_s"]
        assert 0 < phase["first_result_s"] <= phase["wall_s"]
        if phase["phase"] != "epoch 1 valid":  # validation enters as training drains: it may be done at once
            assert phase["own_step_s"] <= phase["first_result_s"]
    assert all(0 < b <= 1 for b in result["busy_fraction"])
    assert 0 < result["efficiency"] <= 1
    assert result["ideal_slides_per_s"] >= result["slides_per_s"]
    assert "| epoch 1 valid | " in format_whole_run(result)
    assert (tmp_path / "bench" / "whole_run.json").is_file()


def test_the_loader_actor_reads_a_relative_cache_dir_as_the_driver_does_with_its_cpus(local_ray, manifest, tmp_path,
                                                                                       monkeypatch):
    """
    data.cache_dir=cache (relative, as in a job's config) is the driver's folder for the loader actor too, which
    runs elsewhere (a job's working_dir copy); its normalisation gets more than Ray's one thread for num_cpus=0.
    """
    record = read_manifest(manifest).split("train")[0]
    cfg = load_config(None, [f"data.manifest={manifest}", "data.cache_dir=cache", "data.augment=false"]).data
    monkeypatch.chdir(tmp_path)  # the driver's working dir, not the loader actor's
    key = cache_key(record.path, cfg.magnification, cfg.level, cfg.base_magnification)
    flat = SlideImage(np.full((32, 40, 3), 200, np.uint8), np.ones((32, 40), bool), cfg.magnification, 0,
                      (0, 0, 32, 40))
    write_cached("cache", record.slide_id, key, flat)  # unlike the slide: its tensor shows where it came from
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready())
    feed = SlideFeed(cfg, group, lambda refs, what: ray.get(refs))
    try:
        [(_, x)] = list(feed.slides([record], SlideLoader(cfg, False, 0), 0, ahead=1))
        x = ray.get(x)
        assert tuple(x.shape) == (1, 3, 32, 40), "not the cached crop"
        assert float(x.flatten(2).std(dim=2).max()) == 0.0  # one value per channel: the flat crop
        assert feed.trace()["threads"] == min(os.cpu_count(), 8)
    finally:
        feed.close()
        remove_placement_group(group)
