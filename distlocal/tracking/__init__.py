"""
Experiment tracking: the only package that talks to MLflow. The driver is the only process that logs.

`make_tracker(cfg, run_dir)` gives an `MlflowTracker` (queued, batched, retried in a background thread: a
tracking server that is down never stops training) or, with `tracking.enabled: false`, a `NullTracker`.

Where runs go: `tracking.uri`, else MLFLOW_TRACKING_URI, else MLflow's SQLite store `RUN.DIR/mlflow.db` with
artifacts in `RUN.DIR/mlartifacts`, which needs no server. See it with
`uv run mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
from pathlib import Path

from distlocal.config import Config

__all__ = ["NullTracker", "make_tracker", "tracking_uri", "flatten", "git_commit", "RUN_ID_FILE"]

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"  # in RUN_DIR: a resumed training continues the same MLflow run


class NullTracker:
    """Tracking switched off: every call does nothing."""

    run_id = None

    def log_params(self, params: dict) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None: ...

    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...

    def wait_ready(self, timeout: float) -> None:
        return None

    def finish(self, status: str = "FINISHED") -> dict:
        return {}


def tracking_uri(cfg: Config) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else the SQLite store in run.dir."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(cfg.run.dir).resolve() / 'mlflow.db'}"


def _artifact_location(cfg: Config, uri: str) -> str | None:
    # Without this, a SQLite store puts artifacts in ./mlruns of whatever folder the user started in.
    if uri.startswith("sqlite:///") and not (cfg.tracking.uri or ""):
        return (Path(cfg.run.dir).resolve() / "mlartifacts").as_uri()
    return None


def make_tracker(cfg: Config, run_dir: Path, resume: bool = False, parent_run_id: str | None = None):
    """The tracker of a training in `run_dir`; a resumed one continues the MLflow run it started."""
    if not cfg.tracking.enabled:
        return NullTracker()
    from distlocal.tracking.sender import MlflowTracker

    run_dir = Path(run_dir)
    id_file = run_dir / RUN_ID_FILE
    run_id = None
    if resume and id_file.is_file():
        run_id = json.loads(id_file.read_text()).get("run_id")
    uri = tracking_uri(cfg)
    tracker = MlflowTracker(uri, cfg.tracking.experiment, run_dir.name, run_id=run_id, parent_run_id=parent_run_id,
                            artifact_location=_artifact_location(cfg, uri), id_file=id_file,
                            spill_path=run_dir / "tracking_unsent.jsonl",
                            flush_timeout_s=cfg.tracking.flush_timeout_s)
    log.info("tracking to MLflow at %s, experiment %r", uri, cfg.tracking.experiment)
    return tracker


def flatten(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as text."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list | type(None)) else str(value)

    walk("", dataclasses.asdict(cfg))
    return out


def git_commit() -> str:
    """The commit of the distlocal source being run, with '+dirty' for uncommitted changes, or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
