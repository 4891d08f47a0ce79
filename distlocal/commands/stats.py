"""distlocal stats MANIFEST [--split train] [--out FILE] [--config CONFIG] [--set key=value ...]"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="CSV with slide_id,path,label,split[,patient_id]")
    p.add_argument("--split", default="train",
                   help="the slides to measure (default train: what the model learns from, no test slide); all: every")
    p.add_argument("--out", help="YAML file for the numbers (default: stats.yaml beside the manifest)")
    p.add_argument("--config", help="YAML config whose data.* read settings (magnification, cache_dir, ...) to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.cache_dir=cache (repeatable)")


def run(args: argparse.Namespace) -> int:
    from distlocal.config_load import load_config
    from distlocal.data.manifest import ManifestError, read_manifest
    from distlocal.data.stats import channel_stats

    cfg = load_config(args.config, args.overrides)
    manifest = read_manifest(args.manifest, cfg.data.classes or None)
    records = manifest.records if args.split == "all" else manifest.split(args.split)
    if not records:
        raise ManifestError(f"manifest {manifest.path} has no slides with split={args.split}; give --split all or "
                            f"a split it has")
    stats = channel_stats(records, cfg.data)
    out = Path(args.out) if args.out else Path(args.manifest).parent / "stats.yaml"
    header = (f"# per-channel mean / std over the tissue pixels of {stats.slides} slide(s) (split {args.split}) of "
              f"{manifest.path}: `distlocal stats`\n")
    out.write_text(header + stats.as_yaml())
    for slide_id in stats.skipped:
        print(f"skipped {slide_id}: unreadable (data.on_error=skip)")
    print(f"{stats.pixels:,} tissue pixels of {stats.slides} slide(s): mean {stats.mean}, std {stats.std}")
    print(f"wrote {out}; put its data.mean and data.std into your config, or train with:\n  {stats.overrides()}")
    return 0
