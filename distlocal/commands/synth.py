"""distlocal synth OUT_DIR --slides N --classes C --size H W --seed S [--task subtype|detect|texture|fine]"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir")
    p.add_argument("--slides", type=int, default=24, help="number of slides")
    p.add_argument("--classes", type=int, default=2, help="number of classes")
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"), help="slide size at 5X")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-magnification", type=float, default=20.0, choices=(20.0, 40.0),
                   help="magnification of level 0 of the written files")
    p.add_argument("--task", default="subtype", choices=("subtype", "detect", "texture", "fine"),
                   help="subtype: every class has its own structure shape; detect: class 0 has none (tumour vs "
                        "normal, easier to learn from scratch); texture: two classes, the same nodules, smooth "
                        "or finely textured (low-level texture decides); fine: the texture task at the scale of one "
                        "10X pixel, invisible at 5X (what a higher magnification buys)")
    p.add_argument("--fraction", type=float, help="share of the tissue the class structures cover (default 0.03; "
                   "texture, fine: 0.12); smaller is harder")
    p.add_argument("--checker", type=float, help="texture, fine: grey levels of class 1's fine texture (default 45); "
                   "smaller is harder")


def run(args: argparse.Namespace) -> int:
    from distlocal.slides import write_synthetic_dataset

    manifest = write_synthetic_dataset(args.out_dir, slides=args.slides, classes=args.classes,
                                       size=tuple(args.size), seed=args.seed,
                                       base_magnification=args.base_magnification, task=args.task,
                                       fraction=args.fraction, checker=args.checker)
    print(f"wrote {args.slides} slides and {manifest}")
    return 0
