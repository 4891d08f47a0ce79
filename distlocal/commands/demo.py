"""distlocal demo [--set key=value ...]: synthetic slides, K = 4 stages on Ray at once, MLflow, a short summary."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# The demo's slide set; data/demo/demo.json records it, so a second demo reuses the slides.
DATASET = {"slides": 40, "classes": 2, "size": [256, 256], "seed": 0, "task": "detect"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of configs/demo.yaml, e.g. --set train.epochs=8 or --set train.executor=local")


def ensure_slides(manifest: Path) -> tuple[Path, bool]:
    """The demo's synthetic slides at ``manifest``'s folder, written unless already there; (manifest, written?)."""
    from distlocal.slides import write_synthetic_dataset

    marker = manifest.parent / "demo.json"
    if manifest.is_file() and marker.is_file() and json.loads(marker.read_text()) == DATASET:
        return manifest, False
    written = write_synthetic_dataset(manifest.parent, slides=DATASET["slides"], classes=DATASET["classes"],
                                      size=tuple(DATASET["size"]), seed=DATASET["seed"], task=DATASET["task"])
    marker.write_text(json.dumps(DATASET))
    return written, True


def run(args: argparse.Namespace) -> int:
    from distlocal.config_load import load_config

    start = time.perf_counter()
    # Config errors show before the slow imports. On a laptop with fewer cores than stages, the stages share the
    # cores: train.cpus_per_stage defaults to what fits the cluster, as for `distlocal train`.
    cfg = load_config(CONFIG, args.overrides)
    manifest = Path(cfg.data.manifest)
    if not manifest.is_file() or manifest.parent.joinpath("demo.json").is_file():  # the demo set, not your own
        manifest, written = ensure_slides(manifest)
        print(f"{'wrote' if written else 'reusing'} {DATASET['slides']} synthetic slides in {manifest.parent}")
    from distlocal.engine.trainer import Trainer
    from distlocal.tracking import tracking_uri

    run_dir = Path(cfg.run.dir) / (cfg.run.name or time.strftime("demo-%Y%m%d-%H%M%S"))
    summary = Trainer(cfg, run_dir).fit()
    print(report(summary, cfg, run_dir, time.perf_counter() - start, tracking_uri(cfg)))
    return 0


def report(summary: dict, cfg, run_dir: Path, seconds: float, uri: str) -> str:
    """
    The demo's closing summary: test accuracy and AUROC (with 95 % CIs) of every classifier and of their ensemble,
    which one decides (predict.classifier), where everything is.
    """
    from distlocal.classifiers import classifier_name, metric_prefix

    test, k = summary.get("test") or {}, cfg.model.k
    split = "test" if any(key.startswith("test/") for key in test) else "valid"
    decided = summary.get("classifier", "H")
    lines = [f"distlocal demo: K={k} stages ({cfg.train.executor} executor), {summary['epochs']} epochs, "
             f"{summary['slides_seen']} training slides seen, in {seconds / 60:.1f} min",
             f"{split} split, best checkpoint (epoch {summary['best_epoch']} of {summary['epochs']}); chance is "
             f"accuracy 0.50, AUROC 0.50:",
             *([f"  chosen because {summary['best_reason']}"] if summary.get("best_reason") else []),
             "  classifier  accuracy  AUROC  (95 % CI)"]
    names = [classifier_name(i, k) for i in range(k)] + (["ensemble"] if k > 1 else [])
    for name in names:
        key = f"{split}/{metric_prefix(name)}"
        acc, auroc = test.get(key + "acc", float("nan")), test.get(key + "auroc", float("nan"))
        low, high = test.get(key + "auroc_ci_low"), test.get(key + "auroc_ci_high")
        ci = f"  ({low:.2f}-{high:.2f})" if low is not None and high is not None else ""
        mark = "  <- decides (predict.classifier)" if name == decided else ""
        lines.append(f"  {name:<10}  {acc:8.3f}  {auroc:5.3f}{ci}{mark}")
    ui = f"uv run mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"
    lines += [f"run folder:  {run_dir}", f"checkpoint:  {run_dir / 'checkpoints' / 'best'}",
              f"plots:       {run_dir / 'plots'} (ROC, confusion matrix, accuracy by depth, attention heatmaps)",
              f"MLflow UI:   {ui}   (then http://127.0.0.1:5000, experiment '{cfg.tracking.experiment}')",
              f"predict:     uv run distlocal predict --checkpoint {run_dir / 'checkpoints' / 'best'} "
              f"--out {run_dir / 'predictions'} {cfg.data.manifest}"]
    return "\n".join(lines)
