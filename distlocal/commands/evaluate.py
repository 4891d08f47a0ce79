"""distlocal eval CONFIG --checkpoint PATH [--split test]"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config whose data settings (manifest, magnification) to use")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoints/best (or /last) folder")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    from distlocal.config_load import load_config
    from distlocal.engine.evaluate import evaluate_checkpoint, format_metrics

    report = evaluate_checkpoint(args.checkpoint, load_config(args.config, args.overrides), args.split)
    print(f"{args.split}: {report['slides']} slides, checkpoint {report['checkpoint']} (validated best: "
          f"{report['best_classifier']})")
    print(format_metrics(report["classifiers"], report["classifier"]))
    return 0
