"""
The test run's own processes: every one a test starts must be gone when the run ends.

A server killed with `terminate()` alone can leave its children running (an `mlflow server` left seven job
consumers spinning at 24 % CPU each). The run makes itself a child subreaper (Linux), so such orphans are
re-parented to it instead of to init, and `leftover_processes` sees every process the run ever started, however
deep. `conftest.py` checks at the end of the run that none is left, ends the ones that are and fails loudly.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["become_subreaper", "end_process_group", "leftover_processes", "end_leftovers"]

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux only); True if it worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _table() -> dict[int, tuple[int, str]]:
    """Every process as pid -> (parent pid, state letter), read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the command name may hold spaces and parentheses
        table[int(entry.name)] = (int(ppid), state)
    return table


def _command(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def leftover_processes(root: int | None = None) -> dict[int, str]:
    """Every live (not zombie) descendant of `root` (default: this process) as pid -> command line."""
    root = os.getpid() if root is None else root
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if table[pid][1] != "Z":
            found[pid] = _command(pid)
        else:  # an adopted orphan that exited: reap it so it does not linger as a zombie
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    return found


def end_leftovers(grace_s: float = 20.0) -> dict[int, str]:
    """Wait up to `grace_s` for descendants to exit by themselves; kill the rest. Returns what had to be killed."""
    deadline = time.monotonic() + grace_s
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    leftover_processes()  # reaps the ones just killed
    return left


def end_process_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """End a process started with `start_new_session=True` and everything it started: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # The leader may exit before its group: wait until no process of the group is left.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leftover_processes()  # reaps the group's members that exited (adopted by this process: zombies till then)
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def simulated_cluster(nodes: int, gpus_per_node: int = 0):
    """
    A head with one CPU and no GPU (the driver's node) and `nodes` raylets of 2 CPUs and `gpus_per_node` (fake)
    GPUs each, on this machine; yields (cluster, its worker nodes) and shuts all of it down. For module fixtures.
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the shared local Ray, if a test before started it: conftest's local_ray starts it again
    # No dashboard: no test here reads it, and its process costs CPU-seconds at start and polls all along.
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        workers = [sim.add_node(num_cpus=2, num_gpus=gpus_per_node) for _ in range(nodes)]
        sim.wait_for_nodes()
        yield sim, workers
    finally:
        ray.shutdown()
        sim.shutdown()


def write_manifest_rows(path: Path, rows: list[dict]) -> Path:
    """A manifest CSV of ``rows`` (dicts with the same keys, written as the header) at ``path``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def damaged_cache(manifest: Path, cache: Path, slide_id: str) -> Path:
    """
    ``manifest`` prepared into ``cache``, then ``slide_id``'s entry damaged inside: its first tile's zstd frame loses
    its magic number. The entry's header and JSON read (the loader hands the slide over); the tile fails only when
    stage 1 decodes it.
    """
    import tifffile

    from distlocal.cli import main
    from distlocal.slides.cache import entry_paths

    assert main(["prepare", str(manifest), "--out", str(cache), "--workers", "1"]) == 0
    image, _ = entry_paths(cache, slide_id)
    with tifffile.TiffFile(image) as tif:
        offset = tif.pages[0].dataoffsets[0]
    with image.open("r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(4))
    return cache
