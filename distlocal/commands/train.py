"""distlocal train CONFIG [--set key=value ...] [--resume RUN_DIR]"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/demo.yaml (not needed with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.k=8 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")


def resolve_run(args: argparse.Namespace):
    """(config, run dir, resuming?) for a new run or a resumed one."""
    from distlocal.config import ConfigError
    from distlocal.config_load import load_config

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; pass the folder of an earlier run "
                              "(runs/NAME)")
        if args.config:
            log.info("--resume: using %s/config.yaml; %s is ignored", run_dir, args.config)
        return load_config(run_dir / "config.yaml", args.overrides), run_dir, True
    if not args.config:
        raise ConfigError("give a CONFIG (e.g. configs/demo.yaml) or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.model.mode}-k{cfg.model.k}"
    run_dir = Path(cfg.run.dir) / name
    if (run_dir / "checkpoints").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                          f"or choose another run.name")
    return cfg, run_dir, False


def run(args: argparse.Namespace) -> int:
    cfg, run_dir, resume = resolve_run(args)  # config errors show before the slow imports below
    from distlocal.engine.trainer import Trainer

    summary = Trainer(cfg, run_dir, resume=resume).fit()
    print(json.dumps({k: v for k, v in summary.items() if k != "last_val"}, indent=2))
    print(f"run folder: {run_dir}  (best checkpoint: {run_dir / 'checkpoints' / 'best'})")
    return 0
