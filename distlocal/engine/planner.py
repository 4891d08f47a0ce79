"""
The planner: resolve model.split=auto and train.plan=auto before the stages are built. Profile on the hardware the
stages will use, then cut the backbone (best_split) or plan the cut and the replicas per stage (plan_pipeline).
train.loaders=auto needs the slowest stage's time per slide: the same profile gives it for the pipeline as
configured (pipeline_plan), and engine/loader_plan.py sets the loaders against it.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from distlocal.config import Config, ConfigError, stage_replicas
from distlocal.config_load import config_from_dict, config_to_dict
from distlocal.model import resolve_device
from distlocal.model.balance import BlockCost, Plan, best_split, pipeline_plan, plan_pipeline, profile_blocks
from distlocal.model.stage import autocast

__all__ = ["profile_on_cluster", "resolve_auto_split", "resolve_plan"]

log = logging.getLogger(__name__)


def _profile(cfg: Config, num_classes: int, slide: torch.Tensor, device: torch.device | str):
    """
    profile_blocks under the precision the stages train in: under bf16 the blocks' times and peaks are not their
    fp32 ones, and a cut balanced on fp32 costs would balance costs the stages never have.
    """
    device = torch.device(device)
    with autocast(device, cfg.train.precision == "bf16"):
        return profile_blocks(cfg, num_classes, slide, device)


def profile_on_cluster(cfg: Config, num_classes: int, slide: torch.Tensor):
    """
    (block costs, device memory in MiB, the task's pid), profiled inside a Ray task with a stage's resources, so
    GPU clusters profile on a GPU, not on the driver.
    """
    import os

    import ray

    from distlocal.engine.placement import connect, stage_resources

    connect()
    cpus, gpus = stage_resources(cfg.train, cfg.model.k)

    def run(cfg, num_classes, slide):
        torch.set_num_threads(max(1, int(cpus)))
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        memory = torch.cuda.get_device_properties(0).total_memory / 2**20 if device == "cuda" else float("inf")
        return _profile(cfg, num_classes, slide, device), memory, os.getpid()

    # max_calls=1 ends the worker after the task, with its CUDA context and cached blocks, which would otherwise
    # stay on the GPU that a stage takes next. Ray honours it only as an argument of ray.remote, not of .options.
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1)(run)
    return ray.get(task.remote(cfg, num_classes, slide))


def _profile_remote(cfg: Config, num_classes: int, slide: torch.Tensor):
    costs, memory, _ = profile_on_cluster(cfg, num_classes, slide)
    return costs, memory


def resolve_auto_split(cfg: Config, num_classes: int, slide: torch.Tensor,
                       costs: list[BlockCost] | None = None) -> Config:
    """
    A copy of `cfg` whose model.blocks_per_stage is the profiled best cut (unchanged unless split=auto); `costs`: a
    profile already taken on the stages' hardware.
    """
    if cfg.model.split != "auto" or cfg.model.blocks_per_stage:
        return cfg
    if costs is None and cfg.train.executor == "ray":
        costs, _ = _profile_remote(cfg, num_classes, slide)
    elif costs is None:
        costs = _profile(cfg, num_classes, slide, resolve_device(cfg.train.device))
    sizes, stage_costs = best_split(costs, cfg.model.k)
    rows = [f"block {c.block:2d}: {c.seconds * 1e3:8.1f} ms  classifier {c.classifier_seconds * 1e3:7.1f} ms  "
            f"peak {c.memory_mb:7.0f} MiB" for c in costs]
    total = sum(c.seconds for c in costs) + sum(costs[sum(sizes[:i + 1]) - 1].classifier_seconds
                                                for i in range(len(sizes)))
    log.info("model.split=auto on a %s slide:\n%s\nchosen blocks per stage %s; stage costs %s ms; ideal speed-up "
             "%.2fx", "x".join(map(str, slide.shape[-2:])), "\n".join(rows), sizes,
             [round(c * 1e3, 1) for c in stage_costs], total / max(stage_costs))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, blocks_per_stage=sizes))


def _devices(cfg: Config) -> int:
    """train.gpus, or every GPU of the cluster."""
    if cfg.train.gpus:
        return cfg.train.gpus
    import ray

    from distlocal.engine.placement import connect

    connect()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if not gpus:
        raise ConfigError("train.plan=auto plans for the cluster's GPUs, but it has none; set train.gpus=N to plan "
                          "for N devices (on CPUs: N stage actors)")
    return gpus


def resolve_plan(cfg: Config, num_classes: int, slide: torch.Tensor) -> tuple[Config, Plan | None]:
    """
    A copy of `cfg` with the planner's cut (with model.split=auto) and train.replicas, and the plan (None unless
    train.plan=auto, or train.loaders=auto on Ray: then the prediction for the pipeline as configured). K stays
    model.k: K and the cut change what is learned, the replicas do not.
    """
    if cfg.train.plan != "auto":
        if not (cfg.train.executor == "ray" and cfg.train.loaders == "auto"):
            return resolve_auto_split(cfg, num_classes, slide), None
        return _configured(cfg, num_classes, slide)
    devices = _devices(cfg)
    costs, memory = _profile_remote(cfg, num_classes, slide)
    fixed = None if cfg.model.split == "auto" else cfg.model.blocks_per_stage
    plan = plan_pipeline(costs, devices, cfg.train.accumulate, cfg.model.k, fixed, 0.9 * memory,
                         cfg.train.allreduce_gb_per_s * 1e9)
    log.info("train.plan=auto on %d device(s): blocks per stage %s, replicas %s; predicted %.3g slides/s, stage "
             "ms per slide %s, busy %s", devices, plan.blocks_per_stage, plan.replicas, plan.slides_per_s,
             [round(s * 1e3, 1) for s in plan.stage_s], [round(b, 2) for b in plan.busy])
    data = config_to_dict(cfg)
    data["model"]["blocks_per_stage"], data["train"]["replicas"] = plan.blocks_per_stage, plan.replicas
    data["train"]["plan"] = "manual"  # the resolved config records the plan itself: a resume keeps it
    return config_from_dict(data), plan  # validated again: e.g. a direct transport does not go with replicas


def _configured(cfg: Config, num_classes: int, slide: torch.Tensor) -> tuple[Config, Plan]:
    """
    train.loaders=auto without train.plan=auto: the profile (one, shared with model.split=auto) priced for the
    pipeline as configured, so the loaders are set against the stage that will be slowest.
    """
    costs, _ = _profile_remote(cfg, num_classes, slide)
    cfg = resolve_auto_split(cfg, num_classes, slide, costs)
    plan = pipeline_plan(costs, cfg.model.blocks_per_stage, stage_replicas(cfg.train, cfg.model.k),
                         cfg.train.accumulate, cfg.train.allreduce_gb_per_s * 1e9)
    log.info("the pipeline as configured: blocks per stage %s, replicas %s; predicted %.3g slides/s, stage ms per "
             "slide %s, busy %s", plan.blocks_per_stage, plan.replicas, plan.slides_per_s,
             [round(s * 1e3, 1) for s in plan.stage_s], [round(b, 2) for b in plan.busy])
    return cfg, plan
