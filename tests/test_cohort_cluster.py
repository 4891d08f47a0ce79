"""
A cohort on a simulated multi-node cluster (ray.cluster_utils.Cluster: several raylets on this machine sharing its
disk, as nodes share a cohort's storage): `distlocal prepare --executor ray` and `distlocal predict --executor ray`.
One cluster for the module: each start costs 10-20 s on 2 cores.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from distlocal.cli import main
from distlocal.config import load_config
from distlocal.data import read_manifest
from distlocal.data.prepare import prepare_slides
from distlocal.data.prepare_ray import prepare_entry, prepare_on_ray
from distlocal.slides.cache import cache_key, read_cached
from tests.interrupt import slowed

WORKER_NODES = 2


@pytest.fixture(scope="module")
def cluster():
    """A head with one CPU (the driver's node) and two nodes of two CPUs each."""
    ray.shutdown()
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        nodes = [sim.add_node(num_cpus=2, num_gpus=0) for _ in range(WORKER_NODES)]
        sim.wait_for_nodes()
        yield sim, nodes
    finally:
        ray.shutdown()
        sim.shutdown()


@pytest.fixture
def on_cluster(no_shared_ray, cluster):
    """The driver connected to the simulated cluster for one test."""
    sim, nodes = cluster
    ray.init(address=sim.address, configure_logging=False, log_to_driver=False)
    return sim, nodes


def _entries(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".tiff", ".json")
            and p.name not in ("prepare.json",)}


def test_prepare_over_two_nodes_equals_local_and_a_rerun_does_nothing(on_cluster, manifest, tmp_path):
    """Every slide is prepared once, on both nodes, into entries equal byte for byte to a local prepare's."""
    _, nodes = on_cluster
    ids = [r.slide_id for r in read_manifest(manifest).records]
    prepare_slides(read_manifest(manifest).records, tmp_path / "local", load_config(None, []).data)
    assert main(["prepare", str(manifest), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    report = json.loads((tmp_path / "ray" / "prepare.json").read_text())
    assert (report["executor"], report["prepared"], report["reused"], report["lost"]) == ("ray", len(ids), 0, [])
    assert {n.node_id for n in nodes} <= set(report["nodes"])  # spread: both worker nodes took slides
    assert sum(report["nodes"].values()) == len(ids)
    ours, theirs = _entries(tmp_path / "ray"), _entries(tmp_path / "local")
    assert len(theirs) == 2 * len(ids)
    assert ours == theirs
    assert not list((tmp_path / "ray").glob("*.partial"))
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir() if p.name in theirs}

    assert main(["prepare", str(manifest), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    again = json.loads((tmp_path / "ray" / "prepare.json").read_text())
    assert (again["prepared"], again["reused"], again["nodes"]) == (0, len(ids), {})
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir() if p.name in written} == written


def test_prepare_loses_nothing_when_a_node_goes_mid_way(on_cluster, manifest, tmp_path):
    """A node removed while its slides are being prepared: they are prepared on the nodes left, none is lost."""
    sim, nodes = on_cluster
    records, data = read_manifest(manifest).records, load_config(None, []).data
    outcome: dict = {}

    def run():
        try:
            outcome["report"] = prepare_on_ray(records, tmp_path / "cache", data, task=slowed(prepare_entry, 1.5))
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "cache").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = nodes[1]
    try:
        sim.remove_node(victim)  # its two running tasks die with it
        thread.join(timeout=300)
    finally:
        nodes[1] = sim.add_node(num_cpus=2, num_gpus=0)  # the module's cluster whole again for the next test
        sim.wait_for_nodes()
    assert not thread.is_alive()
    assert "report" in outcome, outcome.get("error")
    report = outcome["report"]
    assert sorted(report.prepared) == sorted(r.slide_id for r in records)
    assert report.lost == []
    for record in records:
        assert read_cached(tmp_path / "cache", record.slide_id, cache_key(record.path, 5.0, None, None)) is not None
