"""distlocal sync RUN_DIR [--uri URI]: send the tracking records a training could not (tracking_unsent.jsonl)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training's run folder (runs/NAME) holding tracking_unsent.jsonl")
    p.add_argument("--uri", help="tracking URI to send to when the run was never created on a server; default: the "
                   "run's tracking.uri, else MLFLOW_TRACKING_URI (a created run is always continued where it is)")


def run(args: argparse.Namespace) -> int:
    from distlocal.config import ConfigError
    from distlocal.config_load import load_config
    from distlocal.tracking.replay import SPILL_FILE, replay_unsent

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} has no config.yaml; give the folder of a training run, e.g. runs/NAME")
    cfg = load_config(run_dir / "config.yaml", [])
    report = replay_unsent(cfg, run_dir, args.uri)
    if not report:
        print(f"{run_dir}: nothing to send (no {SPILL_FILE})")
        return 0
    print(f"sent to {report['uri']}, MLflow run {report['run_id']}: {report['sent']}")
    if any(report["unsent"].values()) or any(report["dropped"].values()):
        print(f"not sent: {report['unsent']}, refused by the server: {report['dropped']} (last error: "
              f"{report['last_error']}); what is unsent stays in {report['spill_file']}: run this again later")
        return 1
    return 0
