"""
Cohort rates for BENCHMARKS.md: `distlocal prepare`'s slides/s against workers (local threads, Ray tasks) and
`distlocal predict`'s slides/s against models (local, Ray actors), on one machine's own Ray.

    uv run python tools/bench_cohort.py MANIFEST CHECKPOINT OUT [--cpus 2] [--workers 1,2] [--actors 1,2]

Each Ray run starts on a Ray of its own (address="local": another Ray on the machine is not joined) with --cpus
CPUs; its rate includes the first task's or actor's start-up, as a user's first call has. Prints a JSON list.
"""

from __future__ import annotations

import distlocal.engine  # noqa: F401  first: it keeps Ray from rebuilding the venv for each worker (see there)

# isort: split
import argparse
import json
import shutil
from pathlib import Path

import ray

from distlocal.cli import main


def _ray(cpus: int) -> None:
    ray.shutdown()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)


def run() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("manifest")
    p.add_argument("checkpoint")
    p.add_argument("out", type=Path)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--actors", default="1,2")
    args = p.parse_args()
    rows = []
    for executor, counts in (("local", args.workers), ("ray", "0")):
        for n in (int(c) for c in counts.split(",")):
            out = args.out / f"prepare_{executor}_{n}"
            shutil.rmtree(out, ignore_errors=True)
            if executor == "ray":
                _ray(args.cpus)
            main(["prepare", args.manifest, "--out", str(out), "--executor", executor, "--workers", str(max(1, n))])
            report = json.loads((out / "prepare.json").read_text())
            rows.append({"what": "prepare", "executor": executor, "workers": n if n else f"{args.cpus} CPUs",
                         "slides": report["prepared"], "seconds": report["seconds"],
                         "slides_per_s": round(report["prepared"] / report["seconds"], 3)})
    ray.shutdown()
    for executor, counts in (("local", "1"), ("ray", args.actors)):
        for n in (int(c) for c in counts.split(",")):
            out = args.out / f"predict_{executor}_{n}"
            shutil.rmtree(out, ignore_errors=True)
            extra = []
            if executor == "ray":
                _ray(args.cpus)
                extra = ["--actors", str(n), "--cpus-per-actor", str(max(1, args.cpus // n))]
            main(["predict", "--checkpoint", args.checkpoint, "--out", str(out), args.manifest, "--no-heatmaps",
                  "--executor", executor, *extra])
            summary = json.loads((out / "predictions.json").read_text())
            rows.append({"what": "predict", "executor": executor, "models": n, "slides": summary["predicted_now"],
                         "seconds": summary["seconds"], "slides_per_s": summary["slides_per_s"]})
    ray.shutdown()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run()
