"""distlocal split MANIFEST --out DIR [--valid 0.2] [--test 0.2] [--folds K] [--seed S]"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="CSV with slide_id,path,label[,patient_id] (a split column is replaced)")
    p.add_argument("--out", required=True, help="folder for manifest.csv, or fold0/ .. foldK-1/ with --folds")
    p.add_argument("--valid", type=float, default=0.2, help="share of slides for validation")
    p.add_argument("--test", type=float, default=0.2, help="share of slides for testing")
    p.add_argument("--folds", type=int, default=0, help="k folds instead: fold i tests, fold i+1 validates")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from distlocal.data.manifest import read_manifest
    from distlocal.data.splits import write_splits

    for path in write_splits(args.manifest, args.out, args.valid, args.test, args.folds, args.seed):
        counts = {}
        for r in read_manifest(path).records:
            counts[r.split] = counts.get(r.split, 0) + 1
        print(f"{path}: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "valid", "test")))
    return 0
