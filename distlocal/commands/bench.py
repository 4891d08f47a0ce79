"""
distlocal bench pipeline [--config CONFIG] [--set key=value ...] [--slides N] [--size H W]
distlocal bench io [--size H W] [--base-magnification 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["pipeline", "io"], help="pipeline: Ray executor against the local executor; "
                   "io: reading a large slide to 5X against decoding it in full")
    p.add_argument("--config", help="YAML config; default: synthetic slides, resnet18, K=2, one thread per stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--slides", type=int, default=20, help="synthetic training slides when no manifest is given")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="synthetic slide size: at 5X for pipeline (default 384 384), at the base magnification for io "
                        "(default 40000 40000)")
    p.add_argument("--base-magnification", type=float, default=20.0, help="io: the slide's scan magnification")
    p.add_argument("--repeats", type=int, default=3, help="io: reads per way (the median is reported)")
    p.add_argument("--out", default="runs/bench", help="folder for pipeline.json, or io.json and io.png")


_DEFAULTS = ["model.backbone=resnet18", "model.k=2", "model.split=balanced", "model.aux_kernels=[3,1]",
             "model.rfr.patch_size=32", "train.executor=ray", "train.cpus_per_stage=1", "data.augment=false",
             "tracking.enabled=false"]


def run(args: argparse.Namespace) -> int:
    if args.what == "io":
        from distlocal.bench.io import bench_io, format_io

        result = bench_io(args.out, tuple(args.size or (40000, 40000)), args.base_magnification, args.repeats)
        print(format_io(result))
        print(f"plot: {Path(args.out) / 'io.png'}")
        return 0
    from distlocal.bench.pipeline import bench_pipeline, format_result
    from distlocal.config import load_config
    from distlocal.slides import write_synthetic_dataset

    out = Path(args.out)
    cfg = load_config(args.config, [*([] if args.config else _DEFAULTS), *args.overrides])
    if not cfg.data.manifest:
        manifest = write_synthetic_dataset(out / "slides", slides=args.slides, classes=2,
                                           size=tuple(args.size or (384, 384)),
                                           seed=0, splits=(1.0, 0.0, 0.0))
        cfg = load_config(args.config, [*([] if args.config else _DEFAULTS), *args.overrides,
                                        f"data.manifest={manifest}"])
    result = bench_pipeline(cfg, out)
    print(json.dumps(result, indent=2))
    print(format_result(result))
    return 0
