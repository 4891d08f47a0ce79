"""
The ablation table (the paper's Table 4): accuracy and AUROC of H per combination (e.g. K x RFR), mean and spread
over seeds, as markdown and CSV; beside them, where the runs have them, the classifier that decided
(predict.classifier) with its metrics and the ensemble's. Built from finished training summaries or from MLflow runs.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AblationRow", "ablation_rows", "by_classifier", "format_markdown", "table_metric", "write_csv"]

METRICS = ("acc", "balanced_acc", "auroc")
# Beside H's: the deciding classifier's and the ensemble's (runs made before predict.classifier lack them)
EXTRA = ("chosen/acc", "chosen/auroc", "ensemble/acc", "ensemble/auroc")
_STAGE = re.compile(r"stage\d+/(acc|auroc)")  # A_i's, for the table by classifier


@dataclass
class AblationRow:
    """One combination of the swept settings and the metrics of each of its runs (one per seed)."""

    settings: dict[str, str]
    runs: list[dict[str, float | str]] = field(default_factory=list)  # metrics, and "classifier" (which decided)

    def stat(self, metric: str) -> tuple[float, float]:
        """(mean, sample standard deviation) over the runs that have `metric`; std is 0 for a single run."""
        values = [r[metric] for r in self.runs if metric in r and not math.isnan(r[metric])]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def deciders(self) -> str:
        """Which classifier decided in the runs, with counts: e.g. "A_2 ×2, H"."""
        counts: dict[str, int] = {}
        for run in self.runs:
            if "classifier" in run:
                counts[run["classifier"]] = counts.get(run["classifier"], 0) + 1
        return ", ".join(name + (f" ×{n}" if n > 1 else "") for name, n in counts.items()) or "n/a"


def ablation_rows(runs: list[tuple[dict[str, str], dict[str, float]]], by: list[str]) -> list[AblationRow]:
    """Group (settings, metrics) pairs by the values of the `by` keys, in first-seen order."""
    rows: dict[tuple, AblationRow] = {}
    for settings, metrics in runs:
        key = tuple(settings.get(name, "") for name in by)
        rows.setdefault(key, AblationRow(dict(zip(by, key, strict=True)))).runs.append(metrics)
    return list(rows.values())


def table_metric(name: str) -> bool:
    """Whether a test metric (its name after "test/") goes into the tables: H's, the decided and ensemble's, A_i's."""
    return name in METRICS or name in EXTRA or _STAGE.fullmatch(name) is not None


def _cell(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def _extra(rows: list[AblationRow]) -> bool:
    return any(metric in run for row in rows for run in row.runs for metric in EXTRA)


def by_classifier(rows: list[AblationRow], metric: str = "auroc") -> str:
    """
    A second table: `metric` of every classifier (A_1 .. A_{K-1}, H, the ensemble) per combination, mean ± std over
    seeds; a K without some A_i shows n/a there.
    """
    deepest = max((int(key.split("/")[0].removeprefix("stage")) for row in rows for run in row.runs for key in run
                   if key.startswith("stage") and key.endswith(f"/{metric}")), default=0)
    by = list(rows[0].settings) if rows else []
    columns = [(f"A_{i}", f"stage{i}/{metric}") for i in range(1, deepest + 1)]
    columns += [("H", metric), ("ensemble", f"ensemble/{metric}")]
    header = [*by, *[f"{name} {metric}" for name, _ in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.settings[name] for name in by] + [_cell(*row.stat(key)) for _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(rows: list[AblationRow], source: str = "test") -> str:
    """
    A markdown table: one row per combination, H's metrics on `source` as mean ± std over seeds, then (test only)
    the deciding classifier and its metrics, and the ensemble's.
    """
    by = list(rows[0].settings) if rows else []
    extra = _extra(rows)
    header = [*by, "runs", *[f"{source} {m}" for m in METRICS]]
    header += ["decides", *[m.replace("chosen/", "decided ").replace("/", " ") for m in EXTRA]] if extra else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.settings[name] for name in by] + [str(len(row.runs))]
        cells += [_cell(*row.stat(m)) for m in METRICS]
        cells += [row.deciders(), *[_cell(*row.stat(m)) for m in EXTRA]] if extra else []
        lines.append("| " + " | ".join(cells) + " |")
    if extra and source == "test":
        lines += ["", "Test AUROC of every classifier:", "", by_classifier(rows)]
    return "\n".join(lines)


def write_csv(rows: list[AblationRow], path: Path) -> Path:
    """The same table as CSV: mean and std in separate columns."""
    by = list(rows[0].settings) if rows else []
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        extra = _extra(rows)
        metrics = METRICS + (EXTRA if extra else ())
        writer.writerow([*by, "runs", *[f"{m.replace('/', '_')}_{s}" for m in metrics for s in ("mean", "std")],
                         *(["decides"] if extra else [])])
        for row in rows:
            stats = [v for m in metrics for v in row.stat(m)]
            writer.writerow([*(row.settings[name] for name in by), len(row.runs), *stats,
                             *([row.deciders()] if extra else [])])
    return Path(path)
