"""Pick the executor named by train.executor; Ray is imported only when it is asked for."""

from __future__ import annotations

from distlocal.config import Config
from distlocal.engine.local import LocalExecutor
from distlocal.model import build_stages, resolve_device

__all__ = ["make_executor"]


def make_executor(cfg: Config, num_classes: int):
    """LocalExecutor (all stages in this process) or RayExecutor (one actor per stage)."""
    if cfg.train.executor == "ray":
        from distlocal.engine.ray_executor import RayExecutor

        return RayExecutor(cfg, num_classes)
    return LocalExecutor(build_stages(cfg, num_classes, resolve_device(cfg.train.device)))
