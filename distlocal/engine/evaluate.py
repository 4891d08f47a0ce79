"""Forward-only evaluation of every stage's classifier (A_1 .. A_{K-1} and H) on a split."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from distlocal.config import Config
from distlocal.data import ManifestError, SlideLoader, SlideRecord, read_manifest
from distlocal.engine.checkpoint import for_restoring, load_checkpoint
from distlocal.engine.executor import make_executor
from distlocal.engine.metrics import classification_metrics
from distlocal.progress import progress

__all__ = ["classifier_name", "evaluate", "evaluate_checkpoint", "format_metrics", "metrics_line"]

log = logging.getLogger(__name__)


def evaluate(executor, records: list[SlideRecord], loader: SlideLoader, num_classes: int, desc: str = "eval") -> dict:
    """Return {"stages": [metrics of stage 1 .. K], "probs": [...], "labels": [...], "slide_ids": [...]}."""
    labels = {r.slide_id: r.label for r in records}
    ids, per_stage = [], None
    for slide_id, probs in progress(executor.evaluate(records, loader), total=len(records), desc=desc, leave=False):
        per_stage = per_stage or [[] for _ in probs]
        for acc, p in zip(per_stage, probs, strict=True):
            acc.append(p)
        ids.append(slide_id)
    y = torch.tensor([labels[i] for i in ids], dtype=torch.long)
    stacked = [torch.stack(p) for p in per_stage] if per_stage else []
    metrics = [classification_metrics(p, y, num_classes) for p in stacked]
    return {"stages": metrics, "probs": stacked, "labels": y, "slide_ids": ids}


def monitored(metrics: dict, name: str) -> float:
    """The monitored metric, falling back to accuracy where AUROC is undefined (a class absent)."""
    value = metrics[name]
    return metrics["acc"] if math.isnan(value) else value


def classifier_name(index: int, k: int) -> str:
    """The paper's name of stage ``index``'s classifier: A_1 .. A_{K-1}, then H."""
    return "H" if index == k - 1 else f"A_{index + 1}"


def format_metrics(stage_metrics: list[dict]) -> str:
    """A small table: one row per classifier, A_1 .. A_{K-1}, then H."""
    k = len(stage_metrics)
    rows = ["classifier  accuracy  balanced_acc  auroc"]
    for i, m in enumerate(stage_metrics):
        rows.append(f"{classifier_name(i, k):<10}  {m['acc']:8.4f}  {m['balanced_acc']:12.4f}  {m['auroc']:5.4f}")
    return "\n".join(rows)


def metrics_line(stage_metrics: list[dict]) -> str:
    """One line for a log: accuracy / AUROC of H first, then of every A_i."""
    k = len(stage_metrics)
    parts = [f"{classifier_name(i, k)} {stage_metrics[i]['acc']:.3f}/{stage_metrics[i]['auroc']:.3f}"
             for i in (k - 1, *range(k - 1))]
    return ", ".join(parts) + " (accuracy/AUROC)"


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config | None = None, split: str = "test") -> dict:
    """
    Evaluate a saved checkpoint on a manifest split; the model comes from the checkpoint, the data
    settings from `cfg` when given (so a model can be scored on another manifest).
    """
    ckpt = load_checkpoint(checkpoint, stages=False)
    run_cfg = ckpt.config
    if cfg is not None:
        if cfg.model != run_cfg.model:
            log.warning("the model settings of the config differ from the checkpoint's; using the checkpoint's")
        run_cfg.data = cfg.data
    manifest = read_manifest(run_cfg.data.manifest, ckpt.classes)
    records = manifest.split(split)
    if not records:
        raise ManifestError(f"manifest {manifest.path} has no slides with split={split}; nothing to evaluate")
    executor = make_executor(for_restoring(run_cfg), len(ckpt.classes))  # through the Ray pipeline when the run used it
    try:
        executor.load_stages(ckpt.path)
        loader = SlideLoader(run_cfg.data, train=False)
        result = evaluate(executor, records, loader, len(ckpt.classes), desc=f"eval {split}")
    finally:
        executor.close()
    report = {"checkpoint": str(ckpt.path), "split": split, "slides": len(result["slide_ids"]),
              "skipped": [s.__dict__ for s in loader.skipped], "stages": result["stages"]}
    (ckpt.path / f"eval_{split}.json").write_text(json.dumps(report, indent=2))
    return report
