"""
Validation metrics on softmax probabilities: accuracy, balanced accuracy, macro AUROC.

A fresh metric object per call and per classifier: no state shared between stages or splits.
"""

from __future__ import annotations

import math
import warnings

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

__all__ = ["classification_metrics", "MONITORS"]

MONITORS = ("acc", "balanced_acc", "auroc")


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """`probs` N x C (softmax outputs), `labels` N. AUROC is NaN when a class is absent from `labels`."""
    if len(labels) == 0:
        return {name: math.nan for name in MONITORS}
    probs, labels = probs.float(), labels.long()
    acc = multiclass_accuracy(probs, labels, num_classes, average="micro").item()
    # Balanced accuracy is the mean per-class recall; classes absent from `labels` are left out.
    present = torch.bincount(labels, minlength=num_classes) > 0
    recall = multiclass_accuracy(probs, labels, num_classes, average="none")
    balanced = recall[present].mean().item()
    if present.all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auroc = multiclass_auroc(probs, labels, num_classes, average="macro").item()
    else:
        auroc = math.nan
    return {"acc": acc, "balanced_acc": balanced, "auroc": auroc}
