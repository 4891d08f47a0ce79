"""
Which epoch's checkpoint is the best one, and why.

With validation sets of tens of slides, accuracy and AUROC tie across epochs as a rule: an epoch kept only for a
strictly higher score is the first one that reached it, however much training followed. The rule, on the deciding
classifier's validation metrics (predict.classifier):

1. the monitored metric (train.monitor): higher wins, or lower for ``loss``;
2. on a tie, the validation loss (the mean cross-entropy of the true class): lower wins;
3. on a tie again, the later epoch: it trained longer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LOWER_IS_BETTER", "Candidate", "oriented", "select"]

LOWER_IS_BETTER = frozenset({"loss"})


def oriented(value: float, metric: str) -> float:
    """``value`` of ``metric`` such that higher is better (a loss negated); NaN stays NaN."""
    return -value if metric in LOWER_IS_BETTER else value


@dataclass(frozen=True)
class Candidate:
    """One epoch's claim: its deciding classifier's monitored metric and validation loss."""

    epoch: int  # 1-based
    score: float  # the monitored metric, as measured (a loss is not negated)
    loss: float  # validation loss of the same classifier


def _better(new: float, old: float) -> bool:
    """Strictly better (both oriented so that higher is better); NaN never wins, and anything beats NaN."""
    if math.isnan(new):
        return False
    return math.isnan(old) or new > old


def select(monitor: str, candidate: Candidate, best: Candidate | None) -> str | None:
    """
    Why ``candidate`` (a later epoch) replaces ``best`` as the best checkpoint, or None when it does not.

    Example::

        select("acc", Candidate(5, 1.0, 0.08), Candidate(2, 1.0, 0.31))
        # 'acc tied at 1.0000 with epoch 2; lower validation loss (0.0800 < 0.3100)'
    """
    if best is None:
        return f"the first validated epoch ({monitor} {candidate.score:.4f}, validation loss {candidate.loss:.4f})"
    new, old = oriented(candidate.score, monitor), oriented(best.score, monitor)
    if _better(new, old):
        word = "lower" if monitor in LOWER_IS_BETTER else "higher"
        return f"{word} {monitor} ({candidate.score:.4f} against {best.score:.4f} at epoch {best.epoch})"
    if _better(old, new):
        return None
    tie = f"{monitor} tied at {candidate.score:.4f} with epoch {best.epoch}"
    if _better(-candidate.loss, -best.loss):
        return f"{tie}; lower validation loss ({candidate.loss:.4f} < {best.loss:.4f})"
    if _better(-best.loss, -candidate.loss):
        return None
    return f"{tie}, validation loss tied at {candidate.loss:.4f}; the later epoch"
