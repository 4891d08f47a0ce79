"""
The end of a training: the best checkpoint scored on the test split, with bootstrap confidence intervals, and the
plots people look at (ROC curves, confusion matrix, accuracy by stage depth).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.evaluate import evaluate, format_metrics
from distlocal.engine.metrics import bootstrap_ci
from distlocal.plots import accuracy_by_depth, attention_heatmap, confusion_matrix, roc_curves

__all__ = ["final_report", "heatmap_slides"]

log = logging.getLogger(__name__)


def final_report(executor, test_set: list[SlideRecord], valid_set: list[SlideRecord], loader: SlideLoader,
                 classes: list[str], best_val: list[dict] | None, run_dir: Path, seed: int = 0,
                 heatmaps: int = 3) -> dict:
    """
    Score the executor's current stages (the best checkpoint) and write RUN_DIR/test_metrics.json and plots/.

    Returns flat metrics for tracking: `test/{acc,balanced_acc,auroc}` of H with `_ci_low` / `_ci_high`, and
    `test/stage{i}/...` of each A_i. Without a test split the plots show the validation split instead.
    """
    split, records = ("test", test_set) if test_set else ("valid", valid_set)
    result = evaluate(executor, records, loader, len(classes), desc=f"final {split}")
    stages = result["stages"]
    if not stages:
        return {}
    plots = run_dir / "plots"
    probs, labels = result["probs"][-1], result["labels"]
    roc_curves(probs, labels, classes, plots / f"roc_{split}.png", f"H on {split} ({len(labels)} slides)")
    confusion_matrix(probs, labels, classes, plots / f"confusion_{split}.png", f"H on {split}")
    by_split = {"valid (best epoch)": best_val} if best_val else {}
    by_split[split] = stages
    accuracy_by_depth(by_split, plots / "accuracy_by_depth.png")
    report = {"split": split, "slides": len(labels), "stages": stages}
    flat = {}
    if split == "test":
        ci = bootstrap_ci(probs, labels, len(classes), seed=seed)
        report["ci95"] = {name: list(bounds) for name, bounds in ci.items()}
        for name, value in stages[-1].items():
            flat[f"test/{name}"] = value
            flat[f"test/{name}_ci_low"], flat[f"test/{name}_ci_high"] = ci[name]
        for i, metrics in enumerate(stages[:-1]):
            flat.update({f"test/stage{i + 1}/{name}": value for name, value in metrics.items()})
        log.info("test split, best checkpoint (H 95%% CI: acc %.3f-%.3f, auroc %.3f-%.3f):\n%s", *ci["acc"],
                 *ci["auroc"], format_metrics(stages))
    (run_dir / "test_metrics.json").write_text(json.dumps(report, indent=2))
    _heatmaps(executor, heatmap_slides(valid_set, heatmaps), loader, classes, plots / "attention")
    return flat


def heatmap_slides(records: list[SlideRecord], n: int) -> list[SlideRecord]:
    """
    Up to `n` of `records`, taking the classes in turn (class 0, 1, ..., then 0 again), so that every class gets
    a heatmap: a manifest often lists its slides class by class, and the first few would all be one class.
    """
    by_class: dict[int, list[SlideRecord]] = {}
    for record in records:
        by_class.setdefault(record.label, []).append(record)
    rounds = itertools.zip_longest(*(by_class[label] for label in sorted(by_class)))
    return [record for row in rounds for record in row if record is not None][:n]


def _heatmaps(executor, records: list[SlideRecord], loader: SlideLoader, classes: list[str], folder: Path) -> None:
    """H's attention over a few validation slides, one PNG each."""
    by_id = {r.slide_id: r for r in records}
    for slide_id, (probs, attention) in executor.attention(records, loader):
        record = by_id[slide_id]
        predicted = int(probs.argmax())
        title = (f"{slide_id}: true {classes[record.label]}, predicted {classes[predicted]} "
                 f"(p = {float(probs[predicted]):.2f})")
        attention_heatmap(loader.read(record), attention, folder / f"{slide_id}.png", title)
