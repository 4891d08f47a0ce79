"""distlocal compare EXPERIMENT [--uri URI | --run-dir DIR] [--by KEY,KEY] [--sweep NAME] [--out DIR]"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="MLflow experiment name (tracking.experiment, default distlocal)")
    p.add_argument("--uri", help="tracking URI; default: MLFLOW_TRACKING_URI, else RUN_DIR/mlflow.db")
    p.add_argument("--run-dir", default="runs", help="the run.dir of the trainings, for the default local store")
    p.add_argument("--by", help="params to group by, comma-separated (default: those that differ between runs)")
    p.add_argument("--sweep", help="only the children of this sweep (its --name)")
    p.add_argument("--out", help="also write ablation.md and ablation.csv into this folder")


def run(args: argparse.Namespace) -> int:
    from distlocal.ablation import format_markdown, write_csv
    from distlocal.config_load import load_config
    from distlocal.tracking import tracking_uri
    from distlocal.tracking.compare import compare_experiment

    uri = args.uri or tracking_uri(load_config(None, [f"run.dir={args.run_dir}"]))
    by = [k.strip() for k in args.by.split(",")] if args.by else None
    rows, source = compare_experiment(args.experiment, uri, by, args.sweep)
    table = format_markdown(rows, source)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.md").write_text(table + "\n")
        write_csv(rows, out / "ablation.csv")
    return 0
