"""
`distlocal bench loading`: slides per second that the Ray executor's loaders (engine/loading.SlideFeed) deliver to
a sink that does nothing, from the originals and from the `distlocal prepare` cache, against the number of loaders
(train.loaders) and the threads of each (data.prefetch); and the loaders a given stage rate needs.

The sink waits for each slide's tensor to exist (ray.wait without fetching it), so what is timed is what stage 1
could be fed, not the copy to the driver. The need for a stage rate is computed from the measured rate per loader
(loaders_needed): on a small VM the loaders of a 50 slides/s stage cannot all run, but how many it takes can be said.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from distlocal.config import DataConfig
from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.loading import SlideFeed
from distlocal.engine.remote import fetch

__all__ = ["MARGIN", "bench_loading", "format_loading", "loaders_needed"]

MARGIN = 1.2  # the loaders deliver at least this many times what the slowest stage consumes
STAGE_RATES = (1.0, 5.0, 10.0, 25.0, 50.0)  # slides/s: a CPU stage to a fast GPU stage on small 5X slides


def loaders_needed(stage_rate: float, per_loader: float, margin: float = MARGIN) -> int:
    """
    Loaders so that they deliver `margin` x `stage_rate` slides/s when each delivers `per_loader`.

    >>> loaders_needed(50.0, 8.0)
    8
    """
    if per_loader <= 0:
        raise ValueError(f"a loader's rate must be positive, got {per_loader}")
    return max(1, math.ceil(margin * stage_rate / per_loader - 1e-9))


def _deliver(cfg: DataConfig, records: list[SlideRecord], loaders: int) -> float:
    """Slides/s delivered by `loaders` loaders of `cfg.prefetch` threads each (the load-ahead of one pass)."""
    group = placement_group([{"CPU": 1}], strategy="PACK")
    ray.get(group.ready())
    feed = SlideFeed(cfg, group, fetch, loaders, [0])
    try:
        fetch([a.pop_trace.remote() for a in feed.actors], "starting the loaders")  # started: not timed
        start = time.perf_counter()
        for _, ref in feed.slides(records, SlideLoader(cfg, train=False), 0, ahead=loaders * cfg.prefetch):
            ray.wait([ref], fetch_local=False)
        return len(records) / (time.perf_counter() - start)
    finally:
        feed.close()
        remove_placement_group(group)


def bench_loading(records: list[SlideRecord], cfg: DataConfig, cache_dir: str | Path | None,
                  loaders: list[int], threads: list[int]) -> dict:
    """Rates for each source (original; cache when `cache_dir`), loader count and thread count."""
    from dataclasses import replace

    rows = []
    sources = [("original", None)] + ([("cache", str(cache_dir))] if cache_dir else [])
    for source, folder in sources:
        for n in loaders:
            for t in threads:
                rate = _deliver(replace(cfg, cache_dir=folder, prefetch=t), records, n)
                rows.append({"source": source, "loaders": n, "threads": t, "slides_per_s": round(rate, 2),
                             "per_loader": round(rate / n, 2)})
    best = {source: max(r["per_loader"] for r in rows if r["source"] == source) for source, _ in sources}
    need = [{"stage_rate": s, **{source: loaders_needed(s, rate) for source, rate in best.items()}}
            for s in STAGE_RATES]
    return {"slides": len(records), "rows": rows, "best_per_loader": best, "margin": MARGIN, "needed": need}


def format_loading(result: dict) -> str:
    lines = [f"| source | loaders | threads | slides/s | per loader | ({result['slides']} slides)",
             "|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['loaders']} | {r['threads']} | {r['slides_per_s']} | {r['per_loader']} |"
              for r in result["rows"]]
    sources = list(result["best_per_loader"])
    lines += ["", f"loaders needed to deliver {result['margin']}x a stage's rate (from the best rate per loader: "
              + ", ".join(f"{s} {r} slides/s" for s, r in result["best_per_loader"].items()) + ")",
              "| stage slides/s | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    lines += [f"| {n['stage_rate']:g} | " + " | ".join(str(n[s]) for s in sources) + " |" for n in result["needed"]]
    return "\n".join(lines)
