"""
`distlocal bench pipeline --epochs N`: a whole run through the Ray executor, not only its steady state.

Every phase (each epoch's training, each validation, the test) is timed from the call to its first result: the
start-up stall a user waits through N times per run. For the whole run, the actors' own traces give each stage's
busy time; the slowest stage's busy time is the least the run could have taken with that stage never idle, so
efficiency = that time / the run's wall time, and ideal slides/s = slides / that time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from distlocal.bench.pipeline import busy_seconds
from distlocal.config import Config
from distlocal.data import SlideLoader, read_manifest

__all__ = ["bench_whole_run", "format_whole_run"]


def _phase(name: str, results: Iterator) -> dict:
    """Drain one phase; its wall time, first-result latency and slide order."""
    start, first, slides = time.time(), None, []
    for slide_id, _ in results:
        first = first or time.time()
        slides.append(slide_id)
    end = time.time()
    return {"phase": name, "start": start, "end": end, "slides": slides, "wall_s": end - start,
            "first_result_s": (first or end) - start}


def _own_step_s(traces: list[list[tuple]], phase: dict) -> float:
    """
    The first slide's own time through the pipeline: the sum of its stages' step times in that phase. A validation
    may begin before its call (evaluate_next), so a stage's span is its last one for that slide before the end.
    """
    if not phase["slides"]:
        return 0.0
    slide, kind, total = phase["slides"][0], "train" if phase["phase"].endswith("train") else "eval", 0.0
    for trace in traces:
        spans = [(s, e) for k, sid, s, e in trace if k == kind and sid == slide and s <= phase["end"]]
        total += spans[-1][1] - spans[-1][0] if spans else 0.0
    return total


def bench_whole_run(cfg: Config, out_dir: Path, epochs: int, executor=None) -> dict:
    """
    Train `epochs` epochs with validation, then test, through the Ray executor; per-phase and whole-run figures.
    ``executor``: a RayExecutor already started (left open); default: one started (and closed) here.
    """
    from distlocal.engine.ray_executor import RayExecutor

    manifest = read_manifest(cfg.data.manifest)
    train, valid, test = (manifest.split(s) for s in ("train", "valid", "test"))
    created, owned = time.time(), executor is None
    executor = executor or RayExecutor(cfg, len(manifest.classes))
    ready = time.time()
    try:
        phases = []
        for epoch in range(epochs):
            valid_loader = SlideLoader(cfg.data, False)
            executor.evaluate_next(valid, valid_loader)  # as the trainer does: validation follows without a drain
            phases.append(_phase(f"epoch {epoch + 1} train",
                                 executor.train(train, SlideLoader(cfg.data, True, cfg.train.seed), epoch)))
            phases.append(_phase(f"epoch {epoch + 1} valid", executor.evaluate(valid, valid_loader)))
        phases.append(_phase("test", executor.evaluate(test, SlideLoader(cfg.data, False))))
        traces = executor.traces()
        loader = executor.feed.trace()
    finally:
        if owned:
            executor.close()
    begin, end = phases[0]["start"], phases[-1]["end"]
    busy = [busy_seconds(trace, begin, end) for trace in traces]
    slides = sum(len(p["slides"]) for p in phases)
    for p in phases:
        p["own_step_s"] = _own_step_s(traces, p)
        p["stall_s"] = max(0.0, p["first_result_s"] - p["own_step_s"])  # 0: its first slide entered early
        p["slides"] = len(p["slides"])
        del p["start"], p["end"]
    result = {
        "k": cfg.model.k, "backbone": cfg.model.backbone, "epochs": epochs, "slides": slides,
        "max_inflight": cfg.train.max_inflight or cfg.model.k + 1, "start_up_s": (ready - created) if owned else None,
        "wall_s": end - begin, "slides_per_s": slides / (end - begin),
        "stage_busy_s": busy, "busy_fraction": [b / (end - begin) for b in busy],
        "ideal_slides_per_s": slides / max(busy), "efficiency": max(busy) / (end - begin),
        "ideal_speedup": sum(busy) / max(busy), "loader_pids": sorted({pid for _, pid, *_ in loader["loads"]}),
        "phases": phases,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "whole_run.json").write_text(json.dumps(result, indent=2))
    return result


def format_whole_run(r: dict) -> str:
    """Two markdown tables, ready for BENCHMARKS.md: the phases, then the whole run."""
    rows = ["| phase | slides | first result s | its own step s | stall s | wall s |", "|---|---|---|---|---|---|"]
    rows += [f"| {p['phase']} | {p['slides']} | {p['first_result_s']:.2f} | {p['own_step_s']:.2f} | "
             f"{p['stall_s']:.2f} | {p['wall_s']:.1f} |" for p in r["phases"]]
    busy = ", ".join(f"{b:.2f}" for b in r["busy_fraction"])
    rows += ["", "| K | epochs | slides | start-up s | wall s | slides/s | ideal slides/s | efficiency | "
             "ideal speed-up | busy |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| {r['k']} | {r['epochs']} | {r['slides']} | {r['start_up_s'] or 0:.1f} | {r['wall_s']:.1f} | "
             f"{r['slides_per_s']:.2f} | {r['ideal_slides_per_s']:.2f} | {r['efficiency']:.0%} | "
             f"{r['ideal_speedup']:.2f}x | {busy} |"]
    return "\n".join(rows)
