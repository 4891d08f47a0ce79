"""
Send what a training could not: the records its tracker spilled to RUN_DIR/tracking_unsent.jsonl.

`distlocal sync RUN_DIR` replays them, in the order they were logged, into the run's MLflow run (the one named in
RUN_DIR/mlflow_run.json, or a new run when the server was down from the start). Nothing is lost on the way: the
records move to tracking_unsent.replaying.jsonl first, whatever the server still refuses to take is spilled to
tracking_unsent.jsonl again, and the replaying file goes only once the tracker has finished.
"""

from __future__ import annotations

import json
from pathlib import Path

from distlocal.config import Config, ConfigError

__all__ = ["PENDING_FILE", "SPILL_FILE", "replay_unsent", "target"]

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


def target(cfg: Config, run_dir: Path, uri: str | None) -> tuple[str, str | None]:
    """
    (tracking URI, MLflow run id or None) to send RUN_DIR's records to: the server its run was created on, named in
    RUN_DIR/mlflow_run.json; else ``uri``; else the run's own tracking settings.
    """
    from distlocal.tracking import RUN_ID_FILE, tracking_uri

    id_file = run_dir / RUN_ID_FILE
    known = json.loads(id_file.read_text()) if id_file.is_file() else {}
    if known.get("run_id"):
        if uri and uri != known.get("uri"):
            raise ConfigError(f"{run_dir}'s MLflow run {known['run_id']} lives at {known.get('uri')}, not at {uri}; "
                              f"drop --uri to send there, or move {id_file} away to start a new run at {uri}")
        return known.get("uri") or uri or tracking_uri(cfg), known["run_id"]
    return uri or tracking_uri(cfg), None


def _status(uri: str, run_id: str | None) -> str | None:
    """The run's status on the server, None when unknown (no run yet, or the server does not answer)."""
    if run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    from distlocal.tracking.sender import quiet_http_retries

    quiet_http_retries()  # fail fast when the server is still down
    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.status
    except Exception:  # the tracker below retries and reports; this is only a hint
        return None


def replay_unsent(cfg: Config, run_dir: Path, uri: str | None = None) -> dict:
    """Send RUN_DIR's unsent tracking records; the tracker's report (empty when there was nothing to send)."""
    from distlocal.tracking import RUN_ID_FILE, _artifact_location
    from distlocal.tracking.sender import MlflowTracker

    uri, run_id = target(cfg, run_dir, uri)
    items = _take_pending(run_dir)
    if not items:
        return {}
    ends = [item[1] for item in items if item[0] == "end"]
    # A run that already ended on the server (say, a resumed training that finished) keeps its status.
    status = _status(uri, run_id)
    final = status if status in ("FINISHED", "FAILED", "KILLED") else (ends[-1] if ends else "FINISHED")
    tracker = MlflowTracker(uri, cfg.tracking.experiment, run_dir.name, run_id=run_id, id_file=run_dir / RUN_ID_FILE,
                            artifact_location=_artifact_location(cfg, uri), spill_path=run_dir / SPILL_FILE,
                            flush_timeout_s=cfg.tracking.flush_timeout_s)
    tracker.requeue([item for item in items if item[0] != "end"])
    try:
        report = tracker.finish(final)
    finally:
        # Whatever the tracker still holds went back to the spill file in finish(); on an interruption before
        # that, the pending file stays and the next sync sends it (records already sent may then repeat).
        if (run_dir / SPILL_FILE).exists() or not tracker.queue:
            (run_dir / PENDING_FILE).unlink(missing_ok=True)
    return report
