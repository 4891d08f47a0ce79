"""Forward-only evaluation of every stage's classifier (A_1 .. A_{K-1} and H) on a split."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from distlocal.classifiers import choose, classifier_name
from distlocal.config import Config
from distlocal.data import ManifestError, SlideLoader, SlideRecord, read_manifest
from distlocal.engine.checkpoint import for_restoring, load_checkpoint
from distlocal.engine.executor import make_executor
from distlocal.engine.metrics import classification_metrics
from distlocal.progress import progress

__all__ = ["by_classifier", "evaluate", "evaluate_checkpoint", "format_metrics", "metrics_line"]

log = logging.getLogger(__name__)


def evaluate(executor, records: list[SlideRecord], loader: SlideLoader, num_classes: int, desc: str = "eval",
             depth: int | None = None) -> dict:
    """
    {"stages": [metrics of stage 1 .. depth], "probs": [...], "labels": [...], "slide_ids": [...]}; every stage by
    default, else the evaluation stops after stage `depth` (early exit).
    """
    labels = {r.slide_id: r.label for r in records}
    ids, per_stage = [], None
    for slide_id, probs in progress(executor.evaluate(records, loader, depth), total=len(records), desc=desc,
                                    leave=False):
        per_stage = per_stage or [[] for _ in probs]
        for acc, p in zip(per_stage, probs, strict=True):
            acc.append(p)
        ids.append(slide_id)
    y = torch.tensor([labels[i] for i in ids], dtype=torch.long)
    stacked = [torch.stack(p) for p in per_stage] if per_stage else []
    metrics = [classification_metrics(p, y, num_classes) for p in stacked]
    return {"stages": metrics, "probs": stacked, "labels": y, "slide_ids": ids}


def by_classifier(result: dict, num_classes: int, k: int) -> dict[str, dict]:
    """Metrics by classifier name (A_1 .., H) of an `evaluate` result, and of the ensemble when every stage ran."""
    out = {classifier_name(i, k): m for i, m in enumerate(result["stages"])}
    if result["probs"] and len(result["probs"]) == k > 1:
        ensemble = choose("ensemble", k).combine(result["probs"])
        out["ensemble"] = classification_metrics(ensemble, result["labels"], num_classes)
    return out


def monitored(metrics: dict, name: str) -> float:
    """The monitored metric, falling back to accuracy where AUROC is undefined (a class absent)."""
    value = metrics[name]
    return metrics["acc"] if math.isnan(value) else value


def format_metrics(named: dict[str, dict], decided: str | None = None) -> str:
    """A small table: one row per classifier (A_1 .. A_{K-1}, H, ensemble); `decided` is marked with a *."""
    rows = ["classifier  accuracy  balanced_acc  auroc"]
    for name, m in named.items():
        mark = "*" if name == decided else " "
        rows.append(f"{name + mark:<10}  {m['acc']:8.4f}  {m['balanced_acc']:12.4f}  {m['auroc']:5.4f}")
    if decided:
        rows.append(f"* decides (predict.classifier): {decided}")
    return "\n".join(rows)


def metrics_line(named: dict[str, dict]) -> str:
    """One line for a log: accuracy / AUROC of H first, then of every A_i and the ensemble."""
    order = ["H", *(name for name in named if name != "H")]
    return ", ".join(f"{name} {named[name]['acc']:.3f}/{named[name]['auroc']:.3f}" for name in order) + \
        " (accuracy/AUROC)"


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config | None = None, split: str = "test") -> dict:
    """
    Evaluate a saved checkpoint on a manifest split; the model comes from the checkpoint, the data and predict
    settings from `cfg` when given (so a model can be scored on another manifest, or by another classifier).
    The stages run up to the deciding classifier's (predict.classifier): A_i stops after stage i.
    """
    ckpt = load_checkpoint(checkpoint, stages=False)
    run_cfg = ckpt.config
    if cfg is not None:
        if cfg.model != run_cfg.model:
            log.warning("the model settings of the config differ from the checkpoint's; using the checkpoint's")
        run_cfg.data, run_cfg.predict = cfg.data, cfg.predict
    k, recorded = run_cfg.model.k, ckpt.trainer.get("best_classifier", "H")
    choice = choose(run_cfg.predict.classifier, k, recorded)
    manifest = read_manifest(run_cfg.data.manifest, ckpt.classes)
    records = manifest.split(split)
    if not records:
        raise ManifestError(f"manifest {manifest.path} has no slides with split={split}; nothing to evaluate")
    executor = make_executor(for_restoring(run_cfg), len(ckpt.classes))  # through the Ray pipeline when the run used it
    try:
        executor.load_stages(ckpt.path)
        loader = SlideLoader(run_cfg.data, train=False, by_region=run_cfg.model.stream != "off")
        result = evaluate(executor, records, loader, len(ckpt.classes), desc=f"eval {split}", depth=choice.depth)
    finally:
        executor.close()
    named = by_classifier(result, len(ckpt.classes), k)
    report = {"checkpoint": str(ckpt.path), "split": split, "slides": len(result["slide_ids"]),
              "skipped": [s.__dict__ for s in loader.skipped], "classifier": choice.name,
              "best_classifier": recorded, "decided": named.get(choice.name), "classifiers": named,
              "stages": result["stages"]}
    (ckpt.path / f"eval_{split}.json").write_text(json.dumps(report, indent=2))
    return report
