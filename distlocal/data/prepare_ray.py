"""
`distlocal prepare --executor ray`: one Ray task per slide, spread over the cluster's nodes by their CPUs.

Each task reads one original from shared storage and writes its cache entry there (slides/cache.write_cached_regions:
the TIFF renamed into place, then the JSON, so no reader sees half an entry). The driver only decides what is missing
or stale (as the local prepare does), keeps a bounded window of tasks in flight (twice the cluster's CPUs, so the
progress bar and an on_error=fail stop stay prompt and a thousand-slide cohort is not one burst of submissions),
and collects small results. A node lost mid-way kills only the tasks running there; Ray runs them again on the
nodes left (``max_retries``), and every entry already written stays on the shared storage.
"""

from __future__ import annotations

# First: distlocal.engine sets RAY_ENABLE_UV_RUN_RUNTIME_ENV=0, which Ray reads when it is imported. Imported after
# ray, a driver under `uv run` had every worker rebuild the project's venv before its first slide (tens of seconds).
import distlocal.engine  # noqa: F401

# isort: split
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from distlocal.config import DataConfig
from distlocal.data.loader import SkippedSlide
from distlocal.data.manifest import SlideRecord
from distlocal.data.prepare import PrepareReport, prepare_one, split_cached, write_report
from distlocal.engine.placement import connect
from distlocal.progress import progress
from distlocal.slides import SlideError

__all__ = ["ClusterPrepareReport", "prepare_on_ray", "prepare_entry"]

log = logging.getLogger(__name__)

# What a task dies of when its worker or node goes (a bug in the task is not caught: it is raised as it is).
_LOST = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)
# Ray's own retry of a task whose worker or node died: a slide is lost only when its task dies this many times more.
TASK_RETRIES = 3


@dataclass
class ClusterPrepareReport(PrepareReport):
    nodes: dict[str, int] = field(default_factory=dict)  # slides prepared now, by node id
    lost: list[str] = field(default_factory=list)  # slides whose task died on every try (lost nodes or workers)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "executor": "ray", "nodes": self.nodes, "lost": self.lost}


def prepare_entry(record: SlideRecord, out_dir: Path, cfg: DataConfig) -> tuple[str, tuple[float, str] | str, str]:
    """
    One slide's task: (slide id, (MB written, the reader that read it) or the bad slide's reason, node id). A bad
    slide is an answer, not an exception: Ray would otherwise wrap it, and retrying a bad file cannot help.
    """
    node = ray.get_runtime_context().get_node_id()
    try:
        return record.slide_id, prepare_one(record, out_dir, cfg), node
    except SlideError as exc:
        return record.slide_id, str(exc), node


def prepare_on_ray(records: list[SlideRecord], out_dir: str | Path, cfg: DataConfig, force: bool = False,
                   task: Callable = prepare_entry) -> ClusterPrepareReport:
    """
    Prepare `records` into `out_dir` on the Ray cluster of RAY_ADDRESS (or a local Ray); same outputs as
    data.prepare.prepare_slides, plus the slides per node in prepare.json. `task` is prepare_entry (tests slow it).
    """
    out_dir = Path(out_dir).resolve()  # the tasks run elsewhere: a relative path would be their working folder's
    out_dir.mkdir(parents=True, exist_ok=True)
    report, start = ClusterPrepareReport(), time.perf_counter()
    todo = split_cached(records, out_dir, cfg, force, report)
    failure: str | None = None
    if todo:
        connect()
        remote = ray.remote(task).options(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False,
                                          scheduling_strategy="SPREAD")
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        by_id = {r.slide_id: r for r in todo}
        with progress(total=len(todo), desc="prepare (ray)", unit="slide") as bar:
            queue, running = iter(todo), {}
            while True:
                while failure is None and len(running) < window and (record := next(queue, None)):
                    running[remote.remote(record, out_dir, cfg)] = record.slide_id
                if not running:
                    break
                done, _ = ray.wait(list(running), num_returns=1)
                slide_id = running.pop(done[0])
                bar.update()
                try:
                    _, result, node = ray.get(done[0])
                except _LOST as exc:
                    log.error("slide %s: its task died on every try (%s)", slide_id, type(exc).__name__)
                    report.lost.append(slide_id)
                    continue
                if isinstance(result, tuple):
                    megabytes, report.readers[slide_id] = result
                    report.megabytes += megabytes
                    report.prepared.append(slide_id)
                    report.nodes[node] = report.nodes.get(node, 0) + 1
                elif cfg.on_error == "fail":
                    failure = failure or result
                else:
                    log.warning("skipping slide %s: %s", slide_id, result)
                    report.skipped.append(SkippedSlide(slide_id, str(by_id[slide_id].path), result))
                bar.set_postfix(MB_s=f"{report.megabytes / (time.perf_counter() - start):.1f}",
                                nodes=len(report.nodes))
    report.seconds = time.perf_counter() - start
    write_report(out_dir, report)
    left = len(todo) - len(report.prepared) - len(report.skipped)
    if failure is not None:
        raise SlideError(f"{failure}. Preparation stopped ({len(report.prepared)} slide(s) prepared now and kept, "
                         f"{left} not done); fix or remove the slide and run distlocal prepare again to do the "
                         f"rest, or set data.on_error=skip")
    if report.lost:
        raise SlideError(f"{len(report.lost)} slide(s) were not prepared because their tasks died "
                         f"{TASK_RETRIES + 1} times (lost nodes or workers): {report.lost[:5]}; the other "
                         f"{len(report.prepared)} are kept: run distlocal prepare again to do the rest")
    return report
