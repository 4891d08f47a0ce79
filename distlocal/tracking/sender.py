"""
The MLflow tracker: the training thread only queues; one background thread sends, batched, with retries.

A tracking server that is down must never stop or slow a training run. Every call here returns at once; the
sender thread creates the run when it can, sends params, tags, metrics and artifacts in the order they were
logged, and on a transient failure (connection refused, timeout, HTTP 5xx) waits with exponential backoff and
tries the same batch again, keeping everything queued meanwhile. A permanent refusal (an invalid value) drops only
that batch and counts it. `finish` waits up to `flush_timeout_s` for the queue to drain, then writes whatever is
still unsent to a JSON-lines spill file in the run folder and reports how much that is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

__all__ = ["MlflowTracker"]

log = logging.getLogger(__name__)

_BATCH = 900  # MLflow's log_batch takes at most 1000 metrics and 100 params/tags per call
_KV_BATCH = 90
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
              "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def quiet_http_retries() -> None:
    # MLflow's own HTTP client retries 7 times over minutes with 120 s timeouts, inside the call. The sender
    # thread does the retrying here, so each attempt should fail fast. Users can still override these.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class MlflowTracker:
    """Tracks one MLflow run (new, resumed by id, or nested under `parent_run_id`)."""

    def __init__(self, uri: str, experiment: str, run_name: str, *, run_id: str | None = None,
                 parent_run_id: str | None = None, artifact_location: str | None = None,
                 id_file: Path | None = None, spill_path: Path | None = None, flush_timeout_s: float = 30.0,
                 max_backoff_s: float = 30.0):
        from mlflow.tracking import MlflowClient

        quiet_http_retries()
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_id, self.parent_run_id, self.artifact_location = run_id, parent_run_id, artifact_location
        self.id_file, self.spill_path = id_file, spill_path
        self.flush_timeout_s, self.max_backoff_s = flush_timeout_s, max_backoff_s
        self.client = MlflowClient(tracking_uri=uri)
        self.queue: deque[tuple] = deque()
        self.sent, self.dropped = _count([]), _count([])
        self.last_error: str | None = None
        self.ready = threading.Event()  # set once the run exists on the server
        self._wake, self._stop = threading.Condition(), False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- the training thread's side: never blocks ----------------------------------------------------------------

    def _put(self, item: tuple) -> None:
        with self._wake:
            self.queue.append(item)
            self._wake.notify()

    def log_params(self, params: dict) -> None:
        self._put(("params", {k: str(v)[:6000] for k, v in params.items()}))

    def set_tags(self, tags: dict) -> None:
        self._put(("tags", {k: str(v)[:5000] for k, v in tags.items()}))

    def log_metrics(self, metrics: dict, step: int) -> None:
        stamp = int(time.time() * 1000)
        rows = [(k, float(v), stamp, int(step)) for k, v in metrics.items() if isinstance(v, int | float)]
        if rows:
            self._put(("metrics", rows))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        # Absolute, so that a spilled record still finds the file from wherever `distlocal sync` runs.
        self._put(("artifact", str(Path(path).resolve()), artifact_path))

    def requeue(self, items: list[tuple]) -> None:
        """Queue records spilled by an earlier tracker (distlocal sync), in their order."""
        for item in items:
            self._put(tuple(item))

    def wait_ready(self, timeout: float) -> str | None:
        """The run id once the run exists (within `timeout` s), else None."""
        self.ready.wait(timeout)
        return self.run_id if self.ready.is_set() else None

    def finish(self, status: str = "FINISHED") -> dict:
        """Drain the queue (at most flush_timeout_s), end the run, and report what was sent and what was not."""
        self._put(("end", status))
        deadline = time.monotonic() + self.flush_timeout_s
        while self._thread.is_alive() and self.queue and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        unsent = list(self.queue)
        report = {"run_id": self.run_id, "uri": self.uri, "sent": dict(self.sent), "dropped": dict(self.dropped),
                  "unsent": _count(unsent), "last_error": self.last_error, "spill_file": None}
        if any(report["unsent"].values()) and self.spill_path is not None:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("a") as handle:
                for item in unsent:
                    handle.write(json.dumps(item) + "\n")
            report["spill_file"] = str(self.spill_path)
        return report

    # -- the sender thread ------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        backoff = 0.5
        while True:
            with self._wake:
                while not self.queue and not self._stop:
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                if not self.ready.is_set():
                    self._open_run()
                else:
                    self._send(self._take())
                backoff = 0.5
            except Exception as exc:  # the server's problem: never the training's
                if not self.ready.is_set() or _transient(exc):
                    self._note(exc, f"retrying in {backoff:.1f} s")
                    with self._wake:
                        self._wake.wait(timeout=backoff)  # finish() wakes this early
                    backoff = min(self.max_backoff_s, backoff * 2)
                else:
                    item = self.queue.popleft()
                    _tally(self.dropped, item)
                    self._note(exc, f"dropped {item[0]} the server refused")

    def _note(self, exc: Exception, action: str) -> None:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if message != self.last_error:
            log.warning("MLflow tracking at %s: %s (%s); training goes on", self.uri, message, action)
        self.last_error = message

    def _open_run(self) -> None:
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location)
            tags = {"mlflow.runName": self.run_name}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=self.run_name).info.run_id
            if self.id_file is not None:
                self.id_file.parent.mkdir(parents=True, exist_ok=True)
                self.id_file.write_text(json.dumps({"run_id": self.run_id, "uri": self.uri}))
        self.ready.set()

    def _take(self) -> tuple:
        """The next item; consecutive metric rows merged into one batch (up to _BATCH)."""
        head = self.queue[0]
        if head[0] != "metrics":
            return head
        rows, count = list(head[1]), 1
        while count < len(self.queue) and self.queue[count][0] == "metrics" and len(rows) < _BATCH:
            rows.extend(self.queue[count][1])
            count += 1
        return ("metrics", rows[:_BATCH], count)

    def _send(self, item: tuple) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = item[0]
        if kind == "metrics":
            rows, count = item[1], item[2]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in rows])
            for _ in range(count):
                self.queue.popleft()
            self.sent["metrics"] += len(rows)
            return
        if kind in ("params", "tags"):
            entries = list(item[1].items())
            for i in range(0, len(entries), _KV_BATCH):
                chunk = entries[i:i + _KV_BATCH]
                if kind == "params":
                    self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
                else:
                    self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in chunk])
        elif kind == "artifact":
            path, artifact_path = item[1], item[2]
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, path, artifact_path)
            elif Path(path).is_file():
                self.client.log_artifact(self.run_id, path, artifact_path)
            else:
                log.warning("MLflow tracking: artifact %s does not exist; not logged", path)
                self.queue.popleft()
                _tally(self.dropped, item)
                return
        elif kind == "end":
            self.client.set_terminated(self.run_id, status=item[1])
        self.queue.popleft()
        _tally(self.sent, item)


def _transient(exc: Exception) -> bool:
    code = getattr(exc, "error_code", None)
    return code not in _PERMANENT


_KINDS = {"params": "params", "tags": "tags", "metrics": "metrics", "artifact": "artifacts"}  # "end" is no data


def _tally(counts: dict, item: tuple) -> None:
    """Add a queued item's entries to a sent / dropped / unsent count."""
    kind = _KINDS.get(item[0])
    if kind is not None:
        counts[kind] += 1 if kind == "artifacts" else len(item[1])


def _count(items: list[tuple]) -> dict:
    counts = dict.fromkeys(_KINDS.values(), 0)
    for item in items:
        _tally(counts, item)
    return counts
