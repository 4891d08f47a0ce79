"""distlocal sweep CONFIG --grid model.k=4,8 --grid model.rfr.enabled=true,false [--seeds N] [--name NAME]"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config every child starts from (default: the built-in defaults)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values; repeat for more keys (all combinations are trained)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per combination (train.seed, train.seed + 1, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every child (repeatable)")
    p.add_argument("--name", default="", help="sweep folder under run.dir; repeat a sweep's name to resume it")
    p.add_argument("--parallel", type=int, default=0,
                   help="children trained at once; 0: as many as the Ray cluster has room for (1 when local)")


def run(args: argparse.Namespace) -> int:
    from distlocal.config import ConfigError
    from distlocal.sweep import parse_grid, run_sweep

    if args.seeds < 1 or args.parallel < 0:
        raise ConfigError(f"--seeds must be >= 1 and --parallel >= 0, got {args.seeds} and {args.parallel}")
    result = run_sweep(args.config, args.overrides, parse_grid(args.grid), args.seeds, args.parallel or None,
                       args.name)
    print(result["table"])
    print(f"sweep folder: {result['sweep_dir']} (ablation.md, ablation.csv)")
    return 0
