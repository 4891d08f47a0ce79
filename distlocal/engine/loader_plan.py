"""
train.loaders=auto: how many loader actors (engine/loading.py) feed stage 1, from what this run measures.

One loader delivers a slide every `read_s` seconds, measured on the run's first training slides (read, augmented and
normalised as the run does, from data.cache_dir or the originals); the slowest stage takes one every `stage_s`
seconds, the planner's profile of the pipeline (engine/planner.py: train.plan=auto's plan, or the pipeline as
configured). The loaders must deliver MARGIN x what that stage consumes: read times vary from slide to slide and with
the storage's load, and a stage waiting for its input idles its device. A loader is counted at one read at a time,
although it overlaps data.prefetch reads: this errs towards a loader too many, which costs a process, not a device's
time. The count is capped at one loader per CPU the stages leave on the cluster: more would share cores with them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time

from distlocal.config import Config, stage_replicas
from distlocal.data import SlideLoader, SlideRecord
from distlocal.model.balance import Plan
from distlocal.slides import SlideError

__all__ = ["MARGIN", "LoaderPlan", "auto_loaders", "loaders_needed", "measure_read_s", "resolve_loaders"]

log = logging.getLogger(__name__)

MARGIN = 1.2  # the loaders deliver at least this many times what the slowest stage consumes
PROBE_SLIDES = 3  # reads timed for one loader's rate: the median of three shrugs off one cold or odd slide


def loaders_needed(stage_rate: float, per_loader: float, margin: float = MARGIN) -> int:
    """
    Loaders so that they deliver `margin` x `stage_rate` slides/s when each delivers `per_loader`.

    >>> loaders_needed(50.0, 8.0)
    8
    """
    if per_loader <= 0:
        raise ValueError(f"a loader's rate must be positive, got {per_loader}")
    return max(1, math.ceil(margin * stage_rate / per_loader - 1e-9))


def auto_loaders(stage_s: float, read_s: float, cpus: int) -> int:
    """
    train.loaders=auto's count: enough loaders of one read per `read_s` seconds for a stage of `stage_s` seconds per
    slide (with MARGIN), at most `cpus` (at least 1).

    >>> auto_loaders(stage_s=0.02, read_s=0.35, cpus=64)  # a 50 slides/s GPU stage, 0.35 s per cached slide
    21
    """
    return min(loaders_needed(1.0 / stage_s, 1.0 / read_s), max(1, cpus))


@dataclasses.dataclass
class LoaderPlan:
    """What train.loaders=auto measured and chose; logged with the plan, in MLflow params and summary.json."""

    loaders: int  # the count chosen
    read_s: float  # one loader's seconds per slide (median of `slides` reads of this run's slides)
    stage_s: float  # the slowest stage's seconds per slide (the planner's profile)
    needed: int  # loaders for MARGIN x the stage's rate, before the CPU cap
    cpus: int  # the cap: CPUs the stages leave on the cluster
    slides: int  # reads the rate was measured on
    source: str  # where they were read from: data.cache_dir or the originals

    @property
    def delivered_per_s(self) -> float:
        """Slides/s the chosen loaders deliver at the measured rate."""
        return self.loaders / self.read_s

    def params(self) -> dict:
        """For the tracker, beside the replica plan's params."""
        return {"loaders.read_s": round(self.read_s, 4), "loaders.stage_s": round(self.stage_s, 4),
                "loaders.needed": self.needed, "loaders.cpus": self.cpus, "loaders.source": self.source}


def measure_read_s(loader: SlideLoader, records: list[SlideRecord], slides: int = PROBE_SLIDES) -> tuple[float, int]:
    """
    One loader's seconds per slide: the median time of `loader.load` on the first `slides` readable `records` (at
    epoch 0, as the run loads them), and how many were timed. A bad slide under data.on_error=skip is passed over
    (the run skips and reports it); under fail it stops here, naming the file, as the run would at that slide.
    """
    times: list[float] = []
    for record in records:
        if len(times) == slides:
            break
        start = time.perf_counter()
        try:
            loader.load(record, 0)
        except SlideError:
            if loader.cfg.on_error == "fail":
                raise
            continue
        times.append(time.perf_counter() - start)
    if not times:
        raise SlideError(f"train.loaders=auto could not read any of the {len(records)} training slide(s) to time a "
                         f"loader; fix the slides, or set train.loaders to a number")
    return statistics.median(times), len(times)


def _free_cpus(cfg: Config) -> int:
    """CPUs of the cluster the stage actors (replicas included) leave free: the loaders' cap."""
    import ray

    from distlocal.engine.placement import connect, stage_resources

    connect()
    actors = sum(stage_replicas(cfg.train, cfg.model.k))
    per_stage, _ = stage_resources(cfg.train, actors, actors > cfg.model.k)
    return int(ray.cluster_resources().get("CPU", 0) - per_stage * actors + 1e-9)


def resolve_loaders(cfg: Config, plan: Plan | None, records: list[SlideRecord],
                    loader: SlideLoader) -> tuple[Config, LoaderPlan | None]:
    """
    A copy of `cfg` with train.loaders=auto replaced by the count (so the run's config.yaml, and a resume, keep it),
    and what it came from; unchanged, and None, unless the Ray executor has train.loaders=auto. `plan`: the
    planner's, with the stages' seconds per slide.
    """
    if cfg.train.executor != "ray" or cfg.train.loaders != "auto":
        return cfg, None
    if plan is None:
        raise ValueError("train.loaders=auto needs the planner's stage times: resolve_plan first")
    read_s, slides = measure_read_s(loader, records)
    stage_s, cpus = max(plan.stage_s), _free_cpus(cfg)
    needed = loaders_needed(1.0 / stage_s, 1.0 / read_s)
    source = f"data.cache_dir={cfg.data.cache_dir}" if cfg.data.cache_dir else "the originals"
    chosen = LoaderPlan(auto_loaders(stage_s, read_s, cpus), read_s, stage_s, needed, max(1, cpus), slides, source)
    log.info("train.loaders=auto: %d loader(s); one reads a slide in %.3f s (%.3g slides/s, median of %d from %s), "
             "the slowest stage steps one in %.3f s (%.3g slides/s, the planner's profile): they deliver %.3g "
             "slides/s, %.2fx the stage (%d needed for %.1fx, at most %d: the CPUs the stages leave)", chosen.loaders,
             read_s, 1 / read_s, slides, source, stage_s, 1 / stage_s, chosen.delivered_per_s,
             chosen.delivered_per_s * stage_s, needed, MARGIN, chosen.cpus)
    if chosen.loaders < needed:
        log.warning("train.loaders=auto: %d loader(s) deliver %.3g slides/s, less than %.1fx the slowest stage's %.3g: "
                    "loading will set the pace. Prepare the slides (distlocal prepare, data.cache_dir) or add CPU "
                    "nodes for %d loaders", chosen.loaders, chosen.delivered_per_s, MARGIN, 1 / stage_s, needed)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loaders=chosen.loaders)), chosen
