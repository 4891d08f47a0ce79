"""
distlocal predict --checkpoint PATH --out DIR SLIDE_OR_MANIFEST ... [--set key=value] [--no-heatmaps]
                  [--executor local|ray] [--actors N] [--cpus-per-actor N]
"""

from __future__ import annotations

import argparse
import os


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="SLIDE_OR_MANIFEST",
                   help="slide files (.svs, .tiff, ...) and/or manifest CSVs (labels optional)")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoints/best (or /last) folder")
    p.add_argument("--out", required=True, help="folder for predictions.csv, predictions.json and heatmaps/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's data or predict settings, e.g. data.cache_dir=cache or "
                        "predict.max_tile_pixels=4000000, predict.aux_heatmaps=true or predict.classifier=A_2 "
                        "(best: the classifier that validated best; H; A_i: stages 1..i only; ensemble)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the checkpoint's train.device)")
    p.add_argument("--no-heatmaps", action="store_true", help="only the CSV: no attention heatmap PNGs")
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help="local: one model here; ray: one model per GPU of the Ray cluster (or per --cpus-per-actor "
                        "CPUs without GPUs); default ray when RAY_ADDRESS or --address is set. Slides, the "
                        "checkpoint and --out must be on storage every node mounts at the same path")
    p.add_argument("--actors", type=_positive, help="with --executor ray: models to run (default: one per GPU, or the "
                                              "cluster's CPUs / --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=_positive, default=1,
                   help="with --executor ray: CPUs (torch threads) per model")


def run(args: argparse.Namespace) -> int:
    from distlocal.predict import predict

    executor = args.executor or ("ray" if os.environ.get("RAY_ADDRESS") else "local")
    summary = predict(args.checkpoint, args.inputs, args.out, args.overrides, heatmaps=not args.no_heatmaps,
                      device=args.device, executor=executor, actors=args.actors, cpus_per_actor=args.cpus_per_actor)
    accuracy = f", accuracy {summary['accuracy']:.3f} on {summary['labelled']} labelled" if summary["labelled"] else ""
    mean = summary["mean_seconds"]
    print(f"{summary['slides']} slides predicted by {summary['classifier']} (stages 1..{summary['stages_run']}; "
          f"validated best: {summary['best_classifier']}) on {summary['device']}{accuracy}; mean per slide: read "
          f"{mean['read_s']:.3f} s, forward {mean['forward_s']:.3f} s, head {mean['head_s']:.4f} s")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])}: " + ", ".join(s["slide_id"] for s in summary["skipped"]))
    print(f"wrote {args.out}/predictions.csv, {args.out}/predictions.json and {args.out}/heatmaps/")
    return 0
