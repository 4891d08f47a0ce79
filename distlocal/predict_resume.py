"""
The resume log of `distlocal predict`: each finished slide's row, appended as it comes, one JSON line each.

A prediction of thousands of slides stopped half-way (a lost driver, a pre-empted node, Ctrl-C) starts again with
the rows already made, so only the rest is predicted. A row counts only for the same checkpoint (its path and
the files' modification times: a `best` rewritten by further training is another model) and the same overrides
(predict.classifier and data settings change the rows); a line cut short by a crash is ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["ResumeLog"]

log = logging.getLogger(__name__)


class ResumeLog:
    def __init__(self, path: str | Path, checkpoint: str | Path, overrides: list[str] | tuple[str, ...]):
        self.path = Path(path)
        folder = Path(checkpoint).resolve()
        stamps = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
        self.run = {"checkpoint": str(folder), "files": stamps, "overrides": list(overrides)}
        self.run = json.loads(json.dumps(self.run))  # as it reads back (tuples as lists)

    def rows(self) -> dict[str, dict]:
        """The rows logged for this checkpoint and overrides, by slide id."""
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # the last line of a run killed while writing it
                continue
            if entry.get("run") == self.run:
                rows[entry["row"]["slide_id"]] = entry["row"]
        return rows

    def add(self, row: dict) -> dict:
        """Append `row` now (flushed: it survives the driver's end a moment later); returns it."""
        with self.path.open("a") as handle:
            handle.write(json.dumps({"run": self.run, "row": row}) + "\n")
        return row
