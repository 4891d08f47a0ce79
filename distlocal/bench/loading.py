"""
`distlocal bench loading`: slides per second that the Ray executor's loaders (engine/loading.SlideFeed) deliver to
a sink that does nothing, from the originals and from the `distlocal prepare` cache, against the number of loaders
(train.loaders) and the threads of each (data.prefetch); and the count train.loaders=auto picks for a stage rate.

The sink waits for each slide's tensor to exist (ray.wait without fetching it), so what is timed is what stage 1
could be fed, not the copy to the driver. auto's pick comes from auto's own probe (engine/loader_plan.measure_read_s:
one loader's seconds per slide on the first slides) and its own arithmetic, for stage rates up to a fast GPU stage's;
what those loaders deliver is measured where that many loaders were run here, else computed from the probe's rate
(on a small VM the loaders of a 50 slides/s stage cannot all run, but how many it takes, and what they give, can be
said).
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from distlocal.config import DataConfig
from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.loader_plan import MARGIN, auto_loaders, loaders_needed, measure_read_s
from distlocal.engine.loading import SlideFeed
from distlocal.engine.remote import fetch

__all__ = ["MARGIN", "auto_picks", "bench_loading", "format_loading", "loaders_needed"]

STAGE_RATES = (1.0, 5.0, 10.0, 25.0, 50.0)  # slides/s: a CPU stage to a fast GPU stage on small 5X slides


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
    cpus = int(ray.cluster_resources().get("CPU", 1))
    picks = []
    for source, folder in sources:  # auto's own probe: one training read at a time, in this process
        read_s, _ = measure_read_s(SlideLoader(replace(cfg, cache_dir=folder), train=True, seed=0), records)
        picks += auto_picks(read_s, source, rows, cpus)
    return {"slides": len(records), "rows": rows, "margin": MARGIN, "cpus": cpus, "auto": picks}


def auto_picks(read_s: float, source: str, rows: list[dict], cpus: int) -> list[dict]:
    """
    For each stage rate: the loaders train.loaders=auto picks when its probe reads a slide from `source` in `read_s`,
    on a cluster with the CPUs for them and on this one (`cpus`), and what they deliver: measured where that many
    loaders ran here (`rows`: the best of their thread counts), else computed from the probe's rate.
    """
    picks = []
    for stage_rate in STAGE_RATES:
        n = loaders_needed(stage_rate, 1.0 / read_s)
        ran = [r["slides_per_s"] for r in rows if r["source"] == source and r["loaders"] == n]
        picks.append({"stage_rate": stage_rate, "source": source, "read_s": round(read_s, 4), "loaders": n,
                      "here": auto_loaders(1.0 / stage_rate, read_s, cpus),
                      "delivers": round(max(ran) if ran else n / read_s, 2),
                      "how": "measured" if ran else "computed"})
    return picks


def format_loading(result: dict) -> str:
    lines = [f"| source | loaders | threads | slides/s | per loader | ({result['slides']} slides)",
             "|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['loaders']} | {r['threads']} | {r['slides_per_s']} | {r['per_loader']} |"
              for r in result["rows"]]
    lines += ["", f"train.loaders=auto's pick, to deliver {result['margin']}x the slowest stage's rate (one loader's "
              f"rate from auto's probe of the first slides); 'here': capped at this cluster's {result['cpus']} CPUs",
              "| stage slides/s | source | probe s/slide | auto picks | here | they deliver slides/s | x stage | |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {a['stage_rate']:g} | {a['source']} | {a['read_s']} | {a['loaders']} | {a['here']} | {a['delivers']} "
              f"| {a['delivers'] / a['stage_rate']:.2f} | {a['how']} |" for a in result["auto"]]
    return "\n".join(lines)
