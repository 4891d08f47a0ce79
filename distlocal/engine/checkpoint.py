"""
Checkpoints: a folder per checkpoint with one file per stage, the trainer's position and the config.

One file per stage lets each Ray actor write its own; the folder is swapped in atomically so a run
killed while saving still has its previous checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distlocal.config import Config
from distlocal.config_load import config_from_dict, config_to_dict, save_config

__all__ = ["Checkpoint", "CheckpointError", "for_restoring", "load_checkpoint", "save_checkpoint", "stage_file"]


class CheckpointError(FileNotFoundError):
    """A missing or unreadable checkpoint; the message names the path and what to pass instead."""


@dataclass
class Checkpoint:
    path: Path
    stages: list[dict]
    trainer: dict
    config: Config
    classes: list[str]


def for_restoring(cfg: Config) -> Config:
    """The config to build a network whose weights a checkpoint will overwrite: never fetch ImageNet weights again."""
    restored = config_from_dict(config_to_dict(cfg))
    restored.model.pretrained, restored.model.weights = "none", ""
    return restored


def stage_file(directory: str | Path, index: int) -> Path:
    """Where stage `index` (0-based) keeps its part of a checkpoint folder."""
    return Path(directory) / f"stage{index + 1}.pt"


def save_checkpoint(directory: Path, save_stages: Callable[[Path], None], k: int, trainer: dict, cfg: Config,
                    classes: list[str]) -> None:
    """`save_stages(folder)` writes stage1.pt .. stageK.pt (each Ray actor its own); the driver writes the rest."""
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_stages(tmp)
    missing = [stage_file(tmp, i).name for i in range(k) if not stage_file(tmp, i).is_file()]
    if missing:
        raise CheckpointError(f"stage files {missing} did not appear in {tmp}: run.dir must be storage that every "
                              f"node of the cluster can write (a shared file system)")
    torch.save({"trainer": trainer, "config": config_to_dict(cfg), "classes": classes, "k": k},
               tmp / "trainer.pt")
    save_config(cfg, tmp / "config.yaml")  # the resolved config, readable next to the weights
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: str | Path, stages: bool = True) -> Checkpoint:
    """Load a checkpoint folder (a run's checkpoints/last or checkpoints/best); `stages=False` skips the weights."""
    directory = Path(directory)
    if not (directory / "trainer.pt").is_file():
        old = directory.with_name(directory.name + ".old")
        if (old / "trainer.pt").is_file():  # killed between the two renames of save_checkpoint
            directory = old
        else:
            raise CheckpointError(
                f"no checkpoint at {directory} (trainer.pt missing); pass a run's checkpoints/best or "
                f"checkpoints/last folder, e.g. runs/NAME/checkpoints/best"
            )
    meta = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)
    states = []
    for i in range(meta["k"]):
        path = stage_file(directory, i)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {path.name} is missing")
        if stages:
            states.append(torch.load(path, map_location="cpu", weights_only=True))
    return Checkpoint(directory, states, meta["trainer"], config_from_dict(meta["config"]), meta["classes"])
