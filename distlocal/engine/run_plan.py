"""
What a training run decides before its stages start: the planner's cut and replicas (model.split=auto,
train.plan=auto), train.loaders=auto's count, and the capacity check that refuses a slide too large for host memory
or the object store. Kept apart from the trainer's loop, which only reads the results.
"""

from __future__ import annotations

from distlocal.config import Config
from distlocal.data import ManifestError, SlideLoader, SlideRecord
from distlocal.engine.capacity import check_capacity
from distlocal.engine.loader_plan import LoaderPlan, resolve_loaders
from distlocal.engine.planner import resolve_plan
from distlocal.model.balance import Plan
from distlocal.slides import SlideError

__all__ = ["plan_run"]


def plan_run(cfg: Config, classes: int, train_set: list[SlideRecord], records: list[SlideRecord],
             train_loader: SlideLoader, resume: bool) -> tuple[Config, Plan | None, LoaderPlan | None]:
    """
    (the config with the plan applied, the planner's plan, train.loaders=auto's plan); either plan is None when not
    asked for. ``records``: every slide of the manifest, for the capacity check.
    """
    plan = loader_plan = None
    # A resumed run keeps its config's cut and replicas; train.loaders=auto (which a resume from the run's
    # config.yaml no longer has) is measured afresh whenever it is asked for: the count changes no result.
    loaders_auto = cfg.train.executor == "ray" and cfg.train.loaders == "auto"
    if ((cfg.model.split == "auto" or cfg.train.plan == "auto") and not resume) or loaders_auto:
        cfg, plan = resolve_plan(cfg, classes, _sample(cfg, train_set))
        cfg, loader_plan = resolve_loaders(cfg, plan, train_set, train_loader)
    # Before any stage starts: a slide whose maps cannot fit host memory or the object store is refused now.
    check_capacity(cfg, records)
    return cfg, plan, loader_plan


def _sample(cfg: Config, train_set: list[SlideRecord]):
    """The first training slide that reads, for the planner to profile on (a bad one is skipped, or stops)."""
    loader = SlideLoader(cfg.data, train=False)  # decoded whole: the planner profiles a tensor
    for record in train_set:
        try:
            return loader.load(record)
        except SlideError:
            if cfg.data.on_error == "fail":
                raise
    raise ManifestError(f"none of the {len(train_set)} training slides could be read (data.on_error=skip); fix the "
                        f"slides or their paths in data.manifest={cfg.data.manifest}")
