"""
What a higher magnification buys: 5X against 10X on synthetic slides whose evidence exists only above 5X.

`distlocal bench magnification` writes `synth --task fine` slides (two classes, the same nodules; class 1's carry a
checker one 10X pixel across, which a 5X read averages away exactly) and trains four arms on the same slides, a
few seeds each: local K=4 and E2E, both streamed (model.stream=on), at 5X and at 10X. Each run's test split is
scored by the classifier its config picks (predict.classifier), with the bootstrap 95 % CI of engine/metrics.py;
the arms' accuracy and AUROC go to magnification.json and magnification.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from distlocal.config_load import load_config

__all__ = ["ARMS", "bench_magnification", "format_magnification"]

log = logging.getLogger(__name__)

ARMS = [(magnification, mode) for magnification in (5, 10) for mode in ("local", "e2e")]

# Nodules over this share of the tissue (the task's default is 0.12): abundant evidence, so that a few epochs from
# random init on a CPU can find it where it is visible at all.
FRACTION = 0.3

# A CPU-sized run from random init (configs/synthetic.yaml's setting, resnet18 for the 2-core box); every arm
# streams, in tiles of 48 slide px: a 10X slide of this bench is a few tiles a side.
_DEFAULTS = ["model.backbone=resnet18", "model.k=4", "model.split=balanced", "model.pretrained=none",
             "model.classifier_kernels=[3,3,2,1]", "model.rfr.patch_size=16", "model.stream=on",
             "model.stream_tile=48", "train.executor=local", "train.accumulate=2", "train.lr_backbone=1e-4",
             "train.lr_aux=1e-3", "train.device=auto", "train.heatmaps=0", "tracking.enabled=false"]


def bench_magnification(out: Path, slides: int, size: tuple[int, int], seeds: int, epochs: int,
                        overrides: list[str]) -> dict:
    """Train the four arms (``seeds`` runs each) on ``slides`` fine-task slides of ``size`` at 5X; the report."""
    from distlocal.data import read_manifest
    from distlocal.engine.trainer import Trainer
    from distlocal.plots import magnification_bars
    from distlocal.progress import progress
    from distlocal.slides import write_synthetic_dataset

    out = Path(out)
    manifest = out / "slides" / "manifest.csv"
    if not manifest.is_file():  # the same slides for every arm and seed; written once, then reused
        manifest = write_synthetic_dataset(out / "slides", slides=slides, classes=2, size=size, seed=0, task="fine",
                                           fraction=FRACTION)
    runs = []
    bar = progress(total=len(ARMS) * seeds, desc="bench magnification", unit="run")
    for seed in range(seeds):  # every arm's seed 0 first: a stopped bench has comparable runs
        for magnification, mode in ARMS:
            name = f"{mode}_{magnification}x_seed{seed}"
            cfg = load_config(None, [*_DEFAULTS, f"data.manifest={manifest}", f"data.magnification={magnification}",
                                     f"model.mode={mode}", f"train.seed={seed}", f"train.epochs={epochs}",
                                     f"run.dir={out / 'runs'}", f"run.name={name}", *overrides])
            summary_file = out / "runs" / name / "summary.json"
            if summary_file.is_file() and json.loads(summary_file.read_text()).get("completed"):
                summary = json.loads(summary_file.read_text())  # a rerun keeps finished runs
            else:
                summary = Trainer(cfg, out / "runs" / name).fit()
            test = summary["test"]
            runs.append({"magnification": magnification, "mode": mode, "seed": seed,
                         "classifier": summary.get("classifier", ""),
                         **{m: test[f"test/chosen/{m}"] for m in ("acc", "auroc")},
                         **{f"{m}_ci": [test[f"test/chosen/{m}_ci_low"], test[f"test/chosen/{m}_ci_high"]]
                            for m in ("acc", "auroc")}})
            bar.update()
            bar.set_postfix(last=f"{name}: acc {runs[-1]['acc']:.2f}")
    bar.close()
    arms = []
    for magnification, mode in ARMS:
        mine = [r for r in runs if (r["magnification"], r["mode"]) == (magnification, mode)]
        arms.append({"magnification": magnification, "mode": mode,
                     **{m: float(np.mean([r[m] for r in mine])) for m in ("acc", "auroc")},
                     # the seeds' CIs pooled conservatively: the lowest low and the highest high
                     **{f"{m}_ci": [float(min(r[f"{m}_ci"][0] for r in mine)),
                                    float(max(r[f"{m}_ci"][1] for r in mine))] for m in ("acc", "auroc")}})
    report = {"slides": slides, "size_5x": list(size), "fraction": FRACTION, "seeds": seeds, "epochs": epochs,
              "test_slides": len(read_manifest(manifest).split("test")), "overrides": overrides, "arms": arms,
              "runs": runs}
    (out / "magnification.json").write_text(json.dumps(report, indent=2))
    magnification_bars(report, out / "magnification.png")
    return report


def format_magnification(report: dict) -> str:
    """The arms as a table: mean test accuracy and AUROC over the seeds, with the seeds' widest 95 % CI."""
    lines = [f"{report['slides']} fine-task slides of {report['size_5x'][0]} x {report['size_5x'][1]} px at 5X, "
             f"{report['epochs']} epochs, {report['seeds']} seeds per arm, {report['test_slides']} test slides "
             "(scored by the config's predict.classifier)",
             "| arm | test accuracy [95 % CI] | test AUROC [95 % CI] | per seed (acc / AUROC) |", "|---|---|---|---|"]
    for arm in report["arms"]:
        seeds = [r for r in report["runs"] if (r["magnification"], r["mode"]) == (arm["magnification"], arm["mode"])]
        per_seed = ", ".join(f"{r['acc']:.2f} / {r['auroc']:.2f}" for r in seeds)
        lines.append(f"| {arm['mode']} {arm['magnification']}X | {arm['acc']:.2f} [{arm['acc_ci'][0]:.2f}, "
                     f"{arm['acc_ci'][1]:.2f}] | {arm['auroc']:.2f} [{arm['auroc_ci'][0]:.2f}, "
                     f"{arm['auroc_ci'][1]:.2f}] | {per_seed} |")
    return "\n".join(lines)
