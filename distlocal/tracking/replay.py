"""
Send what a training could not: the records its tracker spilled to RUN_DIR/tracking_unsent.jsonl.

`distlocal sync RUN_DIR` replays them, in the order they were logged, into the run's MLflow run (the one named in
RUN_DIR/mlflow_run.json, or a new run when the server was down from the start). Nothing is lost on the way: the
records move to tracking_unsent.replaying.jsonl first, whatever the server still refuses to take is spilled to
tracking_unsent.jsonl again, and the replaying file goes only once the tracker has finished.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from distlocal.config import Config, ConfigError

__all__ = ["PENDING_FILE", "SPILL_FILE", "replay_unsent"]

log = logging.getLogger(__name__)

SPILL_FILE = "tracking_unsent.jsonl"
PENDING_FILE = "tracking_unsent.replaying.jsonl"  # a sync that was cut off left these: the next one sends them


def _take_pending(run_dir: Path) -> list[tuple]:
    """Move the spill behind any records an interrupted sync left, and read them all back."""
    spill, pending = run_dir / SPILL_FILE, run_dir / PENDING_FILE
    if spill.is_file():
        with pending.open("a") as handle:
            handle.write(spill.read_text())
        spill.unlink()
    if not pending.is_file():
        return []
    items = []
    for number, line in enumerate(pending.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(tuple(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{pending}, line {number}, is not a tracking record ({exc}); remove that line and "
                              "run distlocal sync again") from None
    return items


def replay_unsent(cfg: Config, run_dir: Path, uri: str) -> dict:
    """Send RUN_DIR's unsent tracking records to ``uri``; the tracker's report (empty when there was nothing)."""
    from distlocal.tracking import RUN_ID_FILE
    from distlocal.tracking.sender import MlflowTracker

    items = _take_pending(run_dir)
    if not items:
        return {}
    id_file = run_dir / RUN_ID_FILE
    run_id = json.loads(id_file.read_text()).get("run_id") if id_file.is_file() else None
    ends = [item[1] for item in items if item[0] == "end"]
    tracker = MlflowTracker(uri, cfg.tracking.experiment, run_dir.name, run_id=run_id, id_file=id_file,
                            spill_path=run_dir / SPILL_FILE, flush_timeout_s=cfg.tracking.flush_timeout_s)
    tracker.requeue([item for item in items if item[0] != "end"])
    # The training's own end status when it was not sent; a run that ended on the server keeps FINISHED otherwise.
    report = tracker.finish(ends[-1] if ends else "FINISHED")
    (run_dir / PENDING_FILE).unlink()  # what is still unsent is in the spill file again
    return report
