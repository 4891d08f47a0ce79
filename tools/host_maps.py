"""
The host memory a slide's maps take in each stage, as the capacity check counts it (engine/capacity.stage_maps),
for the paper's three slides at 5X, 10X and 20X: computed from the shapes, nothing trained.

    uv run python tools/host_maps.py [--set KEY=VALUE ...]   # e.g. --set train.precision=bf16
"""

from __future__ import annotations

import argparse

from distlocal.bench.memory import PAPER_SIZES
from distlocal.config_load import load_config
from distlocal.engine.capacity import stage_maps
from distlocal.model.backbone import build_backbone, split_backbone
from distlocal.model.budget import GB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(None, ["model.k=4", "model.stream=on", "model.pretrained=none", *args.overrides])
    backbone = build_backbone(cfg.model)
    specs = split_backbone(backbone, cfg.model.k, cfg.model.split, cfg.model.blocks_per_stage)
    print(f"K={cfg.model.k}, {cfg.train.precision}, model.stream={cfg.model.stream}, "
          f"model.stream_stem={cfg.model.stream_stem}: each stage's host maps per slide (GB)")
    print("| slide (5X) | mag. | size (px) | stages (GB) | largest (GB) |\n|---|---|---|---|---|")
    for height, width in PAPER_SIZES:
        for mag in (5, 10, 20):
            shape = (round(height * mag / 5), round(width * mag / 5))
            hosts = [m.host / GB for m in stage_maps(cfg, specs, shape, backbone.stem_stride)]
            print(f"| {height} x {width} | {mag}X | {shape[0]} x {shape[1]} | {' / '.join(f'{h:.1f}' for h in hosts)} "
                  f"| {max(hosts):.1f} |")


if __name__ == "__main__":
    main()
