"""
Checkpoints: a folder per checkpoint with one file per stage, the trainer's position and the config.

One file per stage lets each Ray actor write its own; the folder is swapped in atomically so a run
killed while saving still has its previous checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from distlocal.config import Config, config_from_dict, config_to_dict, save_config

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(FileNotFoundError):
    """A missing or unreadable checkpoint; the message names the path and what to pass instead."""


@dataclass
class Checkpoint:
    path: Path
    stages: list[dict]
    trainer: dict
    config: Config
    classes: list[str]


def save_checkpoint(directory: Path, stages: list[dict], trainer: dict, cfg: Config, classes: list[str]) -> None:
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, state in enumerate(stages):
        torch.save(state, tmp / f"stage{i + 1}.pt")
    torch.save({"trainer": trainer, "config": config_to_dict(cfg), "classes": classes, "k": len(stages)},
               tmp / "trainer.pt")
    save_config(cfg, tmp / "config.yaml")  # the resolved config, readable next to the weights
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Load a checkpoint folder (a run's checkpoints/last or checkpoints/best)."""
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
    stages = []
    for i in range(meta["k"]):
        path = directory / f"stage{i + 1}.pt"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {path.name} is missing")
        stages.append(torch.load(path, map_location="cpu", weights_only=True))
    return Checkpoint(directory, stages, meta["trainer"], config_from_dict(meta["config"]), meta["classes"])
