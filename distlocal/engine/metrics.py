"""
Validation metrics on softmax probabilities: accuracy, balanced accuracy, macro AUROC.

A fresh metric object per call and per classifier: no state shared between stages or splits.
"""

from __future__ import annotations

import math
import warnings

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

__all__ = ["bootstrap_ci", "classification_metrics", "MONITORS"]

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


def bootstrap_ci(probs: torch.Tensor, labels: torch.Tensor, num_classes: int, samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """
    Percentile bootstrap confidence interval of each metric: slides resampled with replacement `samples` times.

    Resamples that lack a class give no AUROC and are left out of its interval; NaN when too few remain.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n, values = len(labels), {name: [] for name in MONITORS}
    if n == 0:
        return {name: (math.nan, math.nan) for name in MONITORS}
    for _ in range(samples):
        index = torch.from_numpy(rng.integers(0, n, n))
        for name, value in classification_metrics(probs[index], labels[index], num_classes).items():
            if not math.isnan(value):
                values[name].append(value)
    tail = (1 - level) / 2 * 100
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) if len(v) >= samples // 2
            else (math.nan, math.nan) for name, v in values.items()}
