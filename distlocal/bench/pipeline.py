"""
`distlocal bench pipeline`: slides/s of the Ray pipeline against the local executor on the same machine, data and
split, each stage's busy fraction, and the ideal bound (sum of stage times / slowest stage time).

The stage times come from the local run, where each stage works alone: they are what the pipeline would get
with no transfer or scheduling cost. Efficiency = Ray slides/s / (1 / slowest stage time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from distlocal.config import Config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.local import LocalExecutor
from distlocal.model import build_stages, resolve_device

__all__ = ["bench_pipeline", "busy_seconds"]

log = logging.getLogger(__name__)


def _timed_run(executor, records, loader, warmup: int) -> tuple[float, list[list[dict]], float]:
    """(slides/s after the first `warmup` slides, metrics per slide, wall time of the measured window start)."""
    metrics, start = [], None
    for n, (_, m) in enumerate(executor.train(records, loader, 0)):
        metrics.append(m)
        if n + 1 == warmup:
            start = time.time()
    return (len(records) - warmup) / (time.time() - start), metrics, start


def busy_seconds(trace: list[tuple[str, str, float, float]], begin: float, end: float) -> float:
    """Seconds of an actor's trace (kind, slide, start, end) that fall within [begin, end]."""
    return sum(max(0.0, min(e, end) - max(s, begin)) for _, _, s, e in trace)


def bench_pipeline(cfg: Config, out_dir: Path, warmup: int = 3) -> dict:
    """Run the same training slides through both executors; return (and write) the measurements."""
    import ray

    from distlocal.engine.ray_executor import RayExecutor

    manifest = read_manifest(cfg.data.manifest)
    records, classes = manifest.split("train"), len(manifest.classes)
    if len(records) <= warmup + 1:
        raise ValueError(f"need more than {warmup + 1} training slides, the manifest has {len(records)}")
    threads = max(1, int(cfg.train.cpus_per_stage))
    torch.set_num_threads(threads)  # the local executor gets what one stage actor gets
    local_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, executor="local"))
    local = LocalExecutor(build_stages(local_cfg, classes, resolve_device(cfg.train.device)))
    log.info("local executor: %d slides, %d torch thread(s)", len(records), threads)
    local_rate, local_metrics, _ = _timed_run(local, records, SlideLoader(cfg.data, True, cfg.train.seed), warmup)
    stage_s = np.mean([[m["step_s"] for m in row] for row in local_metrics[warmup:]], axis=0)
    ideal_rate = 1.0 / stage_s.max()

    log.info("Ray executor: %d stage actors, max_inflight %s", cfg.model.k, cfg.train.max_inflight or "K+1")
    remote = RayExecutor(cfg, classes)
    try:
        ray_rate, ray_metrics, begin = _timed_run(remote, records, SlideLoader(cfg.data, True, cfg.train.seed),
                                                  warmup)
        end = time.time()
        traces = remote.traces()
        devices = [i["device_name"] for i in remote.info]
    finally:
        remote.close()
    ray_stage_s = np.mean([[m["step_s"] for m in row] for row in ray_metrics[warmup:]], axis=0)
    result = {
        "k": cfg.model.k, "backbone": cfg.model.backbone, "blocks_per_stage": cfg.model.blocks_per_stage,
        "split": cfg.model.split, "slides": len(records), "warmup": warmup, "threads_per_stage": threads,
        "max_inflight": cfg.train.max_inflight or cfg.model.k + 1, "devices": devices,
        "local_slides_per_s": local_rate, "ray_slides_per_s": ray_rate, "speedup": ray_rate / local_rate,
        "stage_s": stage_s.tolist(), "ideal_speedup": float(stage_s.sum() / stage_s.max()),
        "ideal_slides_per_s": ideal_rate, "efficiency": ray_rate / ideal_rate,
        "busy_fraction": [busy_seconds(t, begin, end) / (end - begin) for t in traces],
        # Stage times as the actors measured them while sharing the machine: against these, the pipeline's own
        # overhead (scheduling, transfers, waiting) shows apart from the slowdown of co-running stages.
        "ray_stage_s": ray_stage_s.tolist(), "efficiency_vs_actor_times": ray_rate * ray_stage_s.max(),
        "ray_wait_s": np.mean([[m["wait_s"] for m in row] for row in ray_metrics[warmup:]], axis=0).tolist(),
        "cpu_count": os.cpu_count(),
        "ray_resources": ray.cluster_resources() if ray.is_initialized() else {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pipeline.json").write_text(json.dumps(result, indent=2))
    return result


def format_result(r: dict) -> str:
    """A markdown table, ready for BENCHMARKS.md."""
    stages = ", ".join(f"{s * 1e3:.0f}" for s in r["stage_s"])
    actor = ", ".join(f"{s * 1e3:.0f}" for s in r["ray_stage_s"])
    busy = ", ".join(f"{b:.2f}" for b in r["busy_fraction"])
    return "\n".join([
        "| K | in flight | slides | local slides/s | Ray slides/s | speed-up | ideal speed-up | efficiency | "
        "stage ms alone | stage ms in actors | efficiency vs actor times | busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['k']} | {r['max_inflight']} | {r['slides']} | {r['local_slides_per_s']:.2f} | "
        f"{r['ray_slides_per_s']:.2f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['efficiency']:.0%} | "
        f"{stages} | {actor} | {r['efficiency_vs_actor_times']:.0%} | {busy} |",
    ])
