"""
The multi-node paths on a simulated cluster: several real raylets on this machine (ray.cluster_utils.Cluster),
each advertising one GPU that does not exist. Stages reserve those GPUs (explicit train.gpus_per_stage) and compute
on the CPU (train.device=cpu), so placement, GPU ids, node loss and recovery run as on a cluster.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.actor import StageActor
from distlocal.engine.checkpoint import load_checkpoint
from distlocal.engine.faults import ClusterError
from distlocal.engine.placement import stage_resources
from distlocal.engine.ray_executor import RayExecutor
from distlocal.engine.trainer import Trainer
from tests.harness import simulated_cluster
from tests.interrupt import failing_actor, fit_and_interrupt
from tests.tiny_run import tiny_run

GPU_NODES = 2


@pytest.fixture(scope="module")
def cluster():
    """A head without GPUs (the driver's node) and two nodes with 2 CPUs and one fake GPU each."""
    yield from simulated_cluster(GPU_NODES, gpus_per_node=1)


def _cfg(manifest, run_dir, *overrides):
    # One (fake) GPU and one CPU per stage: what places the stages on the simulated nodes.
    return tiny_run(manifest, run_dir, "train.executor=ray", "train.gpus_per_stage=1", "train.cpus_per_stage=1",
                    *overrides)


def test_spread_stages_land_on_different_nodes_and_a_raising_stage_is_reported(on_cluster, manifest, tmp_path):
    """
    K=4 at half a GPU, spread: each GPU node holds two neighbouring stages sharing its GPU, so one hop of three
    crosses the network; each stage reports node and GPU id. Stage 2 sends to stage 3 on the other node over gloo
    and raises: the driver gets that error, not a missing result.
    """
    cfg = _cfg(manifest, tmp_path, "model.k=4", "train.gpus_per_stage=0.5", "train.placement=spread",
               "train.transport=gloo", "train.max_inflight=1")
    executor = RayExecutor(cfg, 2, actor_cls=failing_actor(1, ValueError("stage 2 cannot read this slide")))
    try:
        info = executor.info
        assert executor.transport == "gloo"
        crossing = [i + 1 for i in range(3) if info[i]["node_id"] != info[i + 1]["node_id"]]
        assert crossing == [2]  # stages 1, 2 on one node, 3, 4 on the other: the failing hop crosses nodes
        with pytest.raises(ValueError, match="stage 2 cannot read this slide"):
            list(executor.train(read_manifest(manifest).split("train")[:1], SlideLoader(cfg.data, True, 0), 0))
    finally:
        executor.close()
    by_node: dict[str, list] = {}
    for i in info:
        by_node.setdefault(i["node_id"], []).append(i)
    assert len(by_node) == GPU_NODES
    assert sorted(len(stages) for stages in by_node.values()) == [2, 2]
    assert all(i["gpu_ids"] == ["0"] and i["device"] == "cpu" for i in info)  # each node's one (fake) GPU


def test_more_stages_than_gpus_fail_at_once(on_cluster, manifest, tmp_path):
    """K=3 at one GPU each on two GPUs fails in seconds naming the GPUs asked, the nodes, and the share."""
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"= 3 GPUs, but the cluster has 2 GPUs .*train.gpus_per_stage=0.6666"):
        RayExecutor(_cfg(manifest, tmp_path, "model.k=3", "train.placement=spread"), 2)
    assert time.monotonic() - start < 10


def test_device_cuda_waits_for_gpus_that_join_the_cluster(on_cluster):
    """A GPU node that joins while the driver waits (a KubeRay pod still starting) is used: no CPU run, no error."""
    sim, _ = on_cluster
    cfg = load_config(None, ["train.device=cuda", "train.gpus_per_stage=1", "train.placement_timeout_s=60"]).train
    got: dict = {}

    def place():
        start = time.monotonic()
        got["resources"] = stage_resources(cfg, GPU_NODES + 1)  # three stages at one GPU each: one GPU to come
        got["waited"] = time.monotonic() - start

    waiting = threading.Thread(target=place, daemon=True)
    waiting.start()
    time.sleep(1.0)
    node = sim.add_node(num_cpus=1, num_gpus=1)  # Ray's Cluster needs the main thread
    try:
        waiting.join(timeout=60)
        assert got["resources"] == (1.0, 1.0)
        assert got["waited"] >= 1.0
    finally:
        sim.remove_node(node)


def _node_local_disk(node_ids: set[str]) -> type:
    """A StageActor that, on the nodes `node_ids`, sees its own disk at run.dir (nodes without the shared mount)."""

    class NodeLocalDisk(StageActor):
        def sees(self, folder, marker, token):
            node_id = ray.get_runtime_context().get_node_id()
            if node_id in node_ids:
                folder = f"{folder}-on-{node_id[:8]}"  # the same path, but another disk: the marker is not there
            return super().sees(folder, marker, token)

    return NodeLocalDisk


def test_run_dir_not_shared_by_a_node_fails_naming_it(on_cluster, manifest, tmp_path):
    """A node that does not see the driver's run.dir stops the start with its name and the fix; nothing is kept."""
    _, nodes = on_cluster
    blind = {nodes[1].node_id}  # two stages at one GPU each: one on each node
    names = "|".join(b[:12] for b in blind)
    with pytest.raises(ClusterError, match=rf"run.dir {tmp_path} is not shared: stage \d on node \S+ \(({names})\)"
                                           r".*storage every node mounts at the same path"):
        RayExecutor(_cfg(manifest, tmp_path, "train.placement=spread"), 2, actor_cls=_node_local_disk(blind))
    deadline = time.monotonic() + 20  # the placement group goes: its GPUs are free again
    while ray.available_resources().get("GPU", 0) < GPU_NODES and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == GPU_NODES
    assert [p.name for p in tmp_path.iterdir()] == []  # the marker is removed


def test_losing_a_node_mid_epoch_recovers_and_ends_like_an_uninterrupted_run(on_cluster, actor_threads, manifest,
                                                                           tmp_path):
    """A node with a stage (gloo hops) is removed mid-epoch: the stage restarts elsewhere, the run equals local."""
    sim, nodes = on_cluster
    # Half a GPU each, spread: one stage per node, and room on the other node's GPU for the one that loses its node.
    settings = ("train.max_inflight=1", "train.checkpoint_every=1", "train.transport=gloo", "train.gpus_per_stage=0.5",
                "train.placement=spread", "train.heatmaps=0")
    trainer = Trainer(_cfg(manifest, tmp_path, *settings), tmp_path / "ray")
    assert trainer.executor.transport == "gloo"
    victim = next(n for n in nodes if n.node_id == trainer.executor.info[1]["node_id"])
    # after 2 of the 8 training slides
    outcome = fit_and_interrupt(trainer, tmp_path / "ray", 1, lambda: sim.remove_node(victim))
    assert "summary" in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["completed"]
    assert len(summary["failures"]) == 1
    moved = {i["node_id"] for i in trainer.executor.info}
    assert victim.node_id not in moved  # stage 2 restarted on a node that is still there

    Trainer(_cfg(manifest, tmp_path, *settings, "train.executor=local"), tmp_path / "local").fit()
    ours = load_checkpoint(tmp_path / "ray" / "checkpoints" / "last").stages
    theirs = load_checkpoint(tmp_path / "local" / "checkpoints" / "last").stages
    for a, b in zip(ours, theirs, strict=True):
        assert a["optim"]["steps"] == b["optim"]["steps"]
        for name, tensor in b["modules"].items():
            torch.testing.assert_close(a["modules"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
