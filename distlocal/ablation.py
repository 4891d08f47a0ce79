"""
The ablation table (the paper's Table 4): accuracy and AUROC of H per combination (e.g. K x RFR), mean and spread
over seeds, as markdown and CSV. Built from finished training summaries or from MLflow runs alike.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AblationRow", "ablation_rows", "format_markdown", "write_csv"]

METRICS = ("acc", "balanced_acc", "auroc")


@dataclass
class AblationRow:
    """One combination of the swept settings and the metrics of each of its runs (one per seed)."""

    settings: dict[str, str]
    runs: list[dict[str, float]] = field(default_factory=list)

    def stat(self, metric: str) -> tuple[float, float]:
        """(mean, sample standard deviation) over the runs that have `metric`; std is 0 for a single run."""
        values = [r[metric] for r in self.runs if metric in r and not math.isnan(r[metric])]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ablation_rows(runs: list[tuple[dict[str, str], dict[str, float]]], by: list[str]) -> list[AblationRow]:
    """Group (settings, metrics) pairs by the values of the `by` keys, in first-seen order."""
    rows: dict[tuple, AblationRow] = {}
    for settings, metrics in runs:
        key = tuple(settings.get(name, "") for name in by)
        rows.setdefault(key, AblationRow(dict(zip(by, key, strict=True)))).runs.append(metrics)
    return list(rows.values())


def _cell(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def format_markdown(rows: list[AblationRow], source: str = "test") -> str:
    """A markdown table: one row per combination, H's metrics on `source` as mean ± std over seeds."""
    by = list(rows[0].settings) if rows else []
    header = [*by, "runs", *[f"{source} {m}" for m in METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.settings[name] for name in by] + [str(len(row.runs))]
        cells += [_cell(*row.stat(m)) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[AblationRow], path: Path) -> Path:
    """The same table as CSV: mean and std in separate columns."""
    by = list(rows[0].settings) if rows else []
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*by, "runs", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")]])
        for row in rows:
            stats = [v for m in METRICS for v in row.stat(m)]
            writer.writerow([*(row.settings[name] for name in by), len(row.runs), *stats])
    return Path(path)
