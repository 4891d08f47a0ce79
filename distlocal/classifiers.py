"""
Which classifier decides (``predict.classifier``).

Every stage of a local-learning run ends in a full slide classifier: A_1 .. A_{K-1}, then H. The trainer validates
each of them every epoch and records in the best checkpoint the one that validated best. A prediction is decided by
one of them (``A_i`` or ``H``), by the recorded one (``best``), or by the mean of all their class probabilities
(``ensemble``). A_i needs stages 1..i only, so predicting with it stops there (early exit).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from distlocal.config_error import ConfigError

__all__ = ["CHOICES", "Choice", "best_index", "check_choice", "choose", "classifier_index", "classifier_name",
           "metric_prefix"]

CHOICES = ("best", "H", "ensemble")  # and A_1 .. A_{K-1}
_AUX = re.compile(r"A_(\d+)")


def classifier_name(index: int, k: int) -> str:
    """The paper's name of stage ``index``'s (0-based) classifier: A_1 .. A_{K-1}, then H."""
    return "H" if index == k - 1 else f"A_{index + 1}"


def classifier_index(name: str, k: int) -> int:
    """The 0-based stage of classifier ``name`` (``A_i`` or ``H``) in a K-stage run."""
    if name == "H":
        return k - 1
    match = _AUX.fullmatch(name)
    if match is None or not 1 <= int(match.group(1)) <= k - 1:
        raise ConfigError(check_choice(name, k) or f"{name!r} is not a single classifier; name A_i or H")
    return int(match.group(1)) - 1


def check_choice(choice: str, k: int) -> str | None:
    """The error for an unusable ``predict.classifier`` in a K-stage run (with the fix), or None."""
    match = _AUX.fullmatch(choice)
    if choice in CHOICES or (match and 1 <= int(match.group(1)) <= k - 1):
        return None
    has = "A_1" if k == 2 else f"A_1 .. A_{k - 1}"
    aux = f", or {has}" if k > 1 else ""
    why = " (an end-to-end run has one classifier, H)" if k == 1 and match else f" (K={k} has {has} and H)" if match \
        else ""
    return (f"predict.classifier={choice!r} is not a classifier of this run{why}; choose best (the one that "
            f"validated best), H, ensemble (the mean of all){aux}")


@dataclass(frozen=True)
class Choice:
    """A resolved ``predict.classifier``: the classifiers whose probabilities decide, and the stages to run."""

    name: str  # "A_2", "H" or "ensemble"
    members: tuple[int, ...]  # 0-based stages whose classifiers' probabilities are averaged

    @property
    def depth(self) -> int:
        """Stages to run: 1..depth (early exit for an A_i)."""
        return max(self.members) + 1

    def attention_of(self, k: int) -> str:
        """The classifier whose attention a heatmap shows: the deciding one, H's for the ensemble."""
        return classifier_name(self.depth - 1, k)

    def combine(self, probs: Sequence):
        """The deciding probabilities from every computed classifier's (``probs[i]`` of stage i, 0-based)."""
        if len(self.members) == 1:
            return probs[self.members[0]]
        return sum(probs[i] for i in self.members) / len(self.members)


def choose(choice: str, k: int, recorded: str = "H") -> Choice:
    """Resolve ``choice`` for a K-stage run; ``best`` is ``recorded``, the checkpoint's best-validated classifier."""
    problem = check_choice(choice, k)
    if problem:
        raise ConfigError(problem)
    if choice == "best":
        choice = recorded if check_choice(recorded, k) is None and recorded not in CHOICES else "H"
    if choice == "ensemble":  # of one classifier (an end-to-end run): H
        return Choice("ensemble", tuple(range(k))) if k > 1 else Choice("H", (0,))
    return Choice(choice, (classifier_index(choice, k),))


def metric_prefix(name: str) -> str:
    """Where a classifier's metrics go under test/ or val/: H's at the top, A_i's in stage{i}/, the ensemble's."""
    return "" if name == "H" else "ensemble/" if name == "ensemble" else f"stage{name.removeprefix('A_')}/"


def best_index(scores: Sequence[float]) -> int:
    """The classifier with the highest score; ties go to the shallower one (it is cheaper), NaN never wins."""
    best = 0
    for i, score in enumerate(scores):
        if not math.isnan(score) and (math.isnan(scores[best]) or score > scores[best]):
            best = i
    return best
