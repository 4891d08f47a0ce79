"""
The end of a training: the best checkpoint scored on the test split, with bootstrap confidence intervals, and the
plots people look at (ROC curves, confusion matrix, accuracy by stage depth).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from distlocal.classifiers import Choice, choose, classifier_name, metric_prefix
from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.evaluate import by_classifier, evaluate, format_metrics
from distlocal.engine.metrics import bootstrap_ci
from distlocal.plots import accuracy_by_depth, attention_heatmap, confusion_matrix, roc_curves

__all__ = ["final_report", "heatmap_slides"]

log = logging.getLogger(__name__)


def final_report(executor, *, test_set: list[SlideRecord], valid_set: list[SlideRecord], loader: SlideLoader,
                 classes: list[str], best_val: list[dict] | None, run_dir: Path, seed: int = 0,
                 heatmaps: int = 3, choice: Choice | None = None) -> dict:
    """
    Score the executor's current stages (the best checkpoint) and write RUN_DIR/test_metrics.json and plots/.

    Every classifier is scored (A_1 .. A_{K-1}, H and their ensemble), each with a bootstrap 95 % CI; `choice` (H
    by default) is the one that decides, whose ROC, confusion matrix and attention heatmaps are plotted. Returns
    flat metrics for tracking: `test/{acc,balanced_acc,auroc}` of H (the paper's, which ablations compare) with
    `_ci_low` / `_ci_high`, the same under `test/stage{i}/` for each A_i, `test/ensemble/` and `test/chosen/` (the
    deciding classifier). Without a test split the plots show the validation split instead.
    """
    split, records = ("test", test_set) if test_set else ("valid", valid_set)
    result = evaluate(executor, records, loader, len(classes), desc=f"final {split}")
    stages = result["stages"]
    if not stages:
        return {}
    k, labels = len(stages), result["labels"]
    choice = choice or Choice("H", (k - 1,))
    named = by_classifier(result, len(classes), k)
    probs = {classifier_name(i, k): p for i, p in enumerate(result["probs"])}
    if "ensemble" in named:
        probs["ensemble"] = choose("ensemble", k).combine(result["probs"])
    plots = run_dir / "plots"
    decided = probs[choice.name]
    roc_curves(decided, labels, classes, plots / f"roc_{split}.png", f"{choice.name} on {split} ({len(labels)} slides)")
    confusion_matrix(decided, labels, classes, plots / f"confusion_{split}.png", f"{choice.name} on {split}")
    by_split = {"valid (best epoch)": best_val} if best_val else {}
    by_split[split] = stages
    accuracy_by_depth(by_split, plots / "accuracy_by_depth.png")
    report = {"split": split, "slides": len(labels), "classifier": choice.name, "stages": stages,
              "classifiers": named}
    flat = {}
    if split == "test":
        ci = {name: bootstrap_ci(p, labels, len(classes), seed=seed) for name, p in probs.items()}
        report["ci95"] = {name: {metric: list(bounds) for metric, bounds in c.items()} for name, c in ci.items()}
        for name in probs:
            for prefix in _prefixes(name, choice.name):
                for metric, value in named[name].items():
                    flat[f"{prefix}{metric}"] = value
                    flat[f"{prefix}{metric}_ci_low"], flat[f"{prefix}{metric}_ci_high"] = ci[name][metric]
        log.info("test split, best checkpoint (%s decides: 95%% CI acc %.3f-%.3f, auroc %.3f-%.3f):\n%s",
                 choice.name, *ci[choice.name]["acc"], *ci[choice.name]["auroc"], format_metrics(named, choice.name))
    (run_dir / "test_metrics.json").write_text(json.dumps(report, indent=2))
    _heatmaps(executor, heatmap_slides(valid_set, heatmaps), loader, classes, plots / "attention", choice.depth,
              choice.attention_of(k))
    return flat


def _prefixes(name: str, decided: str) -> list[str]:
    """Where a classifier's test metrics go (`metric_prefix`), and the deciding one's under test/chosen/ too."""
    own = f"test/{metric_prefix(name)}"
    return [own, "test/chosen/"] if name == decided else [own]


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


def _heatmaps(executor, records: list[SlideRecord], loader: SlideLoader, classes: list[str], folder: Path,
              depth: int, shown: str) -> None:
    """Stage `depth`'s classifier's attention (`shown`) over a few validation slides, one PNG each."""
    by_id = {r.slide_id: r for r in records}
    for slide_id, (probs, attention) in executor.attention(records, loader, depth):
        record = by_id[slide_id]
        predicted = int(probs.argmax())
        title = (f"{slide_id}: true {classes[record.label]}, {shown} predicts {classes[predicted]} "
                 f"(p = {float(probs[predicted]):.2f})")
        attention_heatmap(loader.picture(record), attention, folder / f"{slide_id}.png", title,
                          label=f"{shown} attention")
