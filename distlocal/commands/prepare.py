"""
distlocal prepare MANIFEST --out DIR [--config CONFIG] [--set key=value ...] [--workers N] [--force]
[--executor local|ray]
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="CSV with slide_id,path,label,split[,patient_id]")
    p.add_argument("--out", required=True, help="cache folder; train with --set data.cache_dir=DIR")
    p.add_argument("--config", help="YAML config whose data.* read settings (magnification, level, ...) to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.on_error=skip (repeatable)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="slides read at once (each holds one 5X slide in memory)")
    p.add_argument("--force", action="store_true", help="prepare again slides that are already in the cache")
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help="local: threads here (--workers); ray: one task per slide over the Ray cluster's CPUs "
                        "(RAY_ADDRESS, --address, or a local Ray); default ray when RAY_ADDRESS or --address is "
                        "set. Originals and --out must be on storage every node mounts at the same path")


def run(args: argparse.Namespace) -> int:
    from distlocal.config_load import load_config
    from distlocal.data.manifest import read_manifest
    from distlocal.data.prepare import prepare_slides

    cfg = load_config(args.config, args.overrides)
    manifest = read_manifest(args.manifest, cfg.data.classes or None)
    if (args.executor or ("ray" if os.environ.get("RAY_ADDRESS") else "local")) == "ray":
        from distlocal.data.prepare_ray import prepare_on_ray

        report = prepare_on_ray(manifest.records, args.out, cfg.data, force=args.force)
    else:
        report = prepare_slides(manifest.records, args.out, cfg.data, workers=args.workers, force=args.force)
    summary = report.as_dict()
    summary.pop("skipped_slides")
    print(json.dumps(summary, indent=2))
    for slide in report.skipped:
        print(f"skipped {slide.slide_id}: {slide.reason}")
    if report.skipped:
        print(f"{len(report.skipped)} slide(s) skipped (listed in {args.out}/skipped.csv); training with "
              "data.on_error=skip will skip them too")
    print(f"train from the cache with: --set data.cache_dir={args.out}")
    return 0
