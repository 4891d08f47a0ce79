"""
The tiny training run the trainer, tracking and Ray tests build on, written once so its copies cannot drift.

Each test module adds the keys its own assertions rely on (train.executor, train.accumulate, ...) by name, on
top of these, so a reader sees them where they matter.
"""

from __future__ import annotations

from pathlib import Path

from distlocal.config import Config
from distlocal.config_load import load_config

__all__ = ["TINY_RUN", "tiny_run"]

TINY_RUN = (
    "train.device=cpu", "model.backbone=resnet18", "model.k=2", "model.split=balanced", "train.epochs=1",
    "train.accumulate=2", "model.rfr.patch_size=16", "train.lr_backbone=1e-3", "train.lr_aux=1e-3",
    "tracking.enabled=false", "train.placement_timeout_s=30",
)


def tiny_run(manifest: Path | str, run_dir: Path | str, *overrides: str) -> Config:
    """The tiny run on `manifest` in `run_dir`, with `overrides` (``--set`` style) on top."""
    return load_config(None, [f"data.manifest={manifest}", f"run.dir={run_dir}", *TINY_RUN, *overrides])
