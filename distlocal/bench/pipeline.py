"""
`distlocal bench pipeline`: slides/s of the Ray pipeline against the local executor on the same machine, data and
split, each stage's busy fraction, and the ideal bound (sum of stage times / slowest stage time).

The stage times come from the local run, where each stage works alone: they are what the pipeline would get
with no transfer or scheduling cost. Efficiency = Ray slides/s / (1 / slowest stage time).

With replicas (`--replicas 2,1` or `--plan auto`) the same slides also run through the replicated pipeline, and
the planner's cost model, fed the stage times alone, predicts its slides/s beside the measured one.
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

from distlocal.config import Config, stage_replicas
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.local import LocalExecutor
from distlocal.model import build_stages, resolve_device
from distlocal.model.balance import BlockCost, Plan, plan_pipeline

__all__ = ["bench_pipeline", "busy_seconds", "predict_replicas"]

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


def predict_replicas(cfg: Config, stage_s: list[float], param_bytes: list[int], devices: int,
                     replicas: list[int] | None) -> Plan:
    """The planner's prediction for `replicas` (None: its own choice on `devices`) from the stage times alone."""
    costs = [BlockCost(i, s, 0.0, 0.0, b) for i, (s, b) in enumerate(zip(stage_s, param_bytes, strict=True))]
    if replicas is None:
        return plan_pipeline(costs, devices, cfg.train.accumulate, blocks_per_stage=[1] * len(costs),
                             bytes_per_s=cfg.train.allreduce_gb_per_s * 1e9)
    # The plan with these replicas: each stage planned alone on its own replica count.
    stage = [plan_pipeline([c], r, cfg.train.accumulate, blocks_per_stage=[1], bytes_per_s=cfg.train.allreduce_gb_per_s
                           * 1e9) for c, r in zip(costs, replicas, strict=True)]
    times = [p.stage_s[0] for p in stage]
    return Plan([1] * len(costs), [p.replicas[0] for p in stage], times, 1.0 / max(times))


def _ray_run(cfg: Config, classes: int, records, warmup: int) -> dict:
    from distlocal.engine.ray_executor import RayExecutor

    remote = RayExecutor(cfg, classes)
    try:
        rate, metrics, begin = _timed_run(remote, records, SlideLoader(cfg.data, True, cfg.train.seed), warmup)
        end = time.time()
        traces = remote.traces()
        info = remote.info
    finally:
        remote.close()
    return {"rate": rate, "metrics": metrics, "info": info,
            "busy": [busy_seconds(t, begin, end) / (end - begin) for t in traces]}


def bench_pipeline(cfg: Config, out_dir: Path, warmup: int = 3, replicas: list[int] | None = None,
                   plan: bool = False) -> dict:
    """
    Run the same training slides through both executors (and the replicated pipeline with `replicas`, or the
    planner's with `plan`); return (and write) the measurements.
    """
    import ray

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
    single = _ray_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, replicas=1)), classes, records,
                      warmup)
    ray_rate, ray_metrics, devices = single["rate"], single["metrics"], [i["device_name"] for i in single["info"]]
    ray_stage_s = np.mean([[m["step_s"] for m in row] for row in ray_metrics[warmup:]], axis=0)
    result = {
        "k": cfg.model.k, "backbone": cfg.model.backbone, "blocks_per_stage": cfg.model.blocks_per_stage,
        "split": cfg.model.split, "slides": len(records), "warmup": warmup, "threads_per_stage": threads,
        "max_inflight": cfg.train.max_inflight or cfg.model.k + 1, "devices": devices,
        "local_slides_per_s": local_rate, "ray_slides_per_s": ray_rate, "speedup": ray_rate / local_rate,
        "stage_s": stage_s.tolist(), "ideal_speedup": float(stage_s.sum() / stage_s.max()),
        "ideal_slides_per_s": ideal_rate, "efficiency": ray_rate / ideal_rate,
        "busy_fraction": single["busy"],
        # Stage times as the actors measured them while sharing the machine: against these, the pipeline's own
        # overhead (scheduling, transfers, waiting) shows apart from the slowdown of co-running stages.
        "ray_stage_s": ray_stage_s.tolist(), "efficiency_vs_actor_times": ray_rate * ray_stage_s.max(),
        "ray_wait_s": np.mean([[m["wait_s"] for m in row] for row in ray_metrics[warmup:]], axis=0).tolist(),
        "cpu_count": os.cpu_count(),
        "ray_resources": ray.cluster_resources() if ray.is_initialized() else {},
    }
    if replicas or plan:
        result["replicas"] = _bench_replicas(cfg, classes, records, warmup, local, stage_s.tolist(), replicas, ray_rate,
                                             local_rate, ray_stage_s.tolist())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pipeline.json").write_text(json.dumps(result, indent=2))
    return result


def _bench_replicas(cfg: Config, classes: int, records, warmup: int, local: LocalExecutor, stage_s: list[float],
                    replicas: list[int] | None, single_rate: float, local_rate: float, actor_s: list[float]) -> dict:
    """
    The replicated pipeline on the same slides, against R = 1 and the local executor, with the prediction from the
    stage times alone (the planner's profile) and from the R = 1 actors' times: on a machine whose cores the
    actors share, the latter are the times the replicas will really have.
    """
    param_bytes = [sum(p.numel() * p.element_size() for p in s.optim.params()) for s in local.stages]
    devices = cfg.train.gpus or cfg.model.k + 1
    predicted = predict_replicas(cfg, stage_s, param_bytes, devices, replicas)
    unreplicated = predict_replicas(cfg, stage_s, param_bytes, cfg.model.k, [1] * cfg.model.k)
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, replicas=predicted.replicas))
    log.info("Ray executor with replicas %s (predicted %.3g slides/s)", predicted.replicas, predicted.slides_per_s)
    run = _ray_run(run_cfg, classes, records, warmup)
    in_actors = predict_replicas(cfg, actor_s, param_bytes, devices, predicted.replicas)
    return {
        "predicted_from_actor_times": in_actors.slides_per_s,
        "prediction_error_from_actor_times": run["rate"] / in_actors.slides_per_s - 1,
        "replicas": predicted.replicas, "planned": replicas is None, "devices": devices,
        "slides_per_s": run["rate"], "predicted_slides_per_s": predicted.slides_per_s,
        "predicted_stage_s": predicted.stage_s, "predicted_busy": predicted.busy,
        "prediction_error": run["rate"] / predicted.slides_per_s - 1,
        "unreplicated_predicted_slides_per_s": unreplicated.slides_per_s,
        "speedup_vs_unreplicated": run["rate"] / single_rate, "speedup_vs_local": run["rate"] / local_rate,
        "busy_fraction": {f"stage{i['stage']}/replica{i['replica']}": b
                          for i, b in zip(run["info"], run["busy"], strict=True)},
        "step_s": np.mean([[m["step_s"] for m in row] for row in run["metrics"][warmup:]], axis=0).tolist(),
        "accumulate": cfg.train.accumulate, "configured_replicas": stage_replicas(cfg.train, cfg.model.k),
    }


def format_replicas(r: dict) -> str:
    """The replicated run as a markdown table, ready for BENCHMARKS.md."""
    rep = r["replicas"]
    busy = ", ".join(f"{k} {v:.2f}" for k, v in rep["busy_fraction"].items())
    return "\n".join([
        "| replicas | accumulate | local slides/s | R=1 Ray slides/s | replicated slides/s | predicted (times alone) | "
        "predicted (actor times) | vs R=1 | vs local | busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {rep['replicas']} | {rep['accumulate']} | {r['local_slides_per_s']:.2f} | {r['ray_slides_per_s']:.2f} | "
        f"{rep['slides_per_s']:.2f} | {rep['predicted_slides_per_s']:.2f} ({rep['prediction_error']:+.0%}) | "
        f"{rep['predicted_from_actor_times']:.2f} ({rep['prediction_error_from_actor_times']:+.0%}) | "
        f"{rep['speedup_vs_unreplicated']:.2f}x | {rep['speedup_vs_local']:.2f}x | {busy} |",
    ])


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
