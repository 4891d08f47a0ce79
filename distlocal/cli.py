"""
distlocal command line. Each command lives in distlocal/commands/ and imports its heavy parts lazily.

uv run distlocal train configs/demo.yaml --set model.k=8
uv run distlocal train --resume runs/NAME
uv run distlocal eval configs/demo.yaml --checkpoint runs/NAME/checkpoints/best
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

__all__ = ["main"]

# command -> (module in distlocal.commands, one-line help)
COMMANDS = {
    "demo": ("demo", "the whole thing on synthetic slides: K = 4 stages on Ray, MLflow, a summary (a few minutes)"),
    "synth": ("synth", "write synthetic pyramidal TIFF slides and their manifest"),
    "prepare": ("prepare", "read every slide of a manifest once into a cache of 5X tissue crops, in parallel"),
    "stats": ("stats", "a cohort's per-channel mean / std over tissue pixels, for data.mean / data.std"),
    "split": ("split", "make stratified, patient-grouped train/valid/test splits or k folds of a manifest"),
    "train": ("train", "train the stages (or the end-to-end baseline) on a manifest"),
    "eval": ("evaluate", "evaluate a checkpoint's classifiers H and A_i on a split"),
    "predict": ("predict", "predict new slides with a checkpoint: predictions.csv and attention heatmaps"),
    "sweep": ("sweep", "train every combination of --grid values (and seeds) as nested MLflow runs; ablation table"),
    "sync": ("sync", "send the tracking records that a training's MLflow server did not take (tracking_unsent.jsonl)"),
    "compare": ("compare", "print the ablation table (accuracy and AUROC per setting) of an MLflow experiment"),
    "bench": ("bench", "measure: pipeline (Ray against local), io (slide reading), memory (training step), "
                       "inference (whole slide against patch-based GABMIL)"),
}


_RAY_COMMANDS = ("train", "eval", "sweep", "bench", "demo", "prepare", "predict")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distlocal", description="Whole-slide classification by locally "
                                     "supervised learning, pipelined over GPUs with Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(f"distlocal.commands.{module}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        modules[name].add_arguments(command)
        if name in _RAY_COMMANDS:
            command.add_argument("--address", help="join this Ray cluster (HOST:6379) instead of RAY_ADDRESS or a "
                                 "local Ray started here")
    args = parser.parse_args(argv)
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address  # read when the driver connects (engine/placement.connect)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from distlocal.errors import USER_ERRORS

    try:
        return modules[args.command].run(args) or 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
