"""
Placing K stage actors on a Ray cluster: one bundle per stage, kept on one node unless asked otherwise.

A run that cannot be placed must fail with what it asked for and what the cluster has, never hang.
"""

from __future__ import annotations

import logging
import math
import os
import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

from distlocal.config import TrainConfig
from distlocal.engine.faults import ClusterError

__all__ = ["bundle_order", "connect", "place_stages", "stage_resources"]

log = logging.getLogger(__name__)


def connect() -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local Ray on this machine."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    try:
        # A local Ray started here skips the dashboard: on a laptop its agents take CPU from the stages.
        ray.init(address=address or None, log_to_driver=True, configure_logging=False,
                 **({} if address else {"include_dashboard": False}))
    except ConnectionError as exc:
        raise ClusterError(f"could not reach the Ray cluster at RAY_ADDRESS={address} ({exc}); start it with "
                           f"`ray start --head` or unset RAY_ADDRESS to run on a local Ray") from None


def _totals() -> tuple[float, float]:
    total = ray.cluster_resources()
    return total.get("CPU", 0.0), total.get("GPU", 0.0)


def _nodes() -> str:
    rows = []
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            rows.append(f"{node.get('NodeManagerAddress', '?')}: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    return "; ".join(rows) or "no live nodes"


def _wait_for_gpus(cfg: TrainConfig, k: int) -> tuple[float, float]:
    """
    (CPUs, GPUs) of the cluster once it has the GPUs train.device=cuda needs (any GPU, or K x gpus_per_stage), or
    after train.placement_timeout_s. A cluster whose GPU nodes are still starting (a head with `GPU: 0`, a KubeRay
    pod being scheduled) reports none yet: placing at once would give bundles without GPUs and train on CPUs.
    """
    need = cfg.gpus_per_stage * k if cfg.gpus_per_stage > 0 else 1e-4
    cpus, gpus = _totals()
    if gpus + 1e-9 >= need:
        return cpus, gpus
    from ray.autoscaler.sdk import request_resources

    per = cfg.gpus_per_stage if cfg.gpus_per_stage > 0 else 1.0
    request_resources(bundles=[{"GPU": per}] * k)  # an autoscaler starts GPU nodes for it; elsewhere a no-op
    start = time.monotonic()
    said = -math.inf
    try:
        while gpus + 1e-9 < need and time.monotonic() - start < cfg.placement_timeout_s:
            if time.monotonic() - said >= 10:
                said = time.monotonic()
                log.warning("train.device=%s: waiting for GPUs (the cluster has %g, %d stages need %s; %s), at most "
                            "%g s more (train.placement_timeout_s)", cfg.device, gpus, k,
                            f"{need:g}" if cfg.gpus_per_stage > 0 else "some", _nodes(),
                            cfg.placement_timeout_s - (said - start))
            time.sleep(0.5)
            cpus, gpus = _totals()
    finally:
        request_resources(bundles=[])  # the placement group asks for itself from now on
    if not gpus:
        raise ClusterError(
            f"train.device={cfg.device} needs GPUs, but the cluster has 0 GPUs after waiting "
            f"{cfg.placement_timeout_s:g} s ({_nodes()}); if GPU nodes are still starting, raise "
            f"train.placement_timeout_s; to train on CPUs set train.device=cpu")
    return cpus, gpus


def _share(gpus: float) -> float:
    """
    A GPU share at Ray's resource precision (1e-4; its docs ask for no finer), rounded down so that K of them
    never add up to more than the GPUs, however Ray rounds (ray 2.60 was seen placing 6 x 1/6 on one GPU).
    """
    return math.floor(gpus * 1e4 + 1e-6) / 1e4


def stage_resources(cfg: TrainConfig, k: int, replicated: bool = False) -> tuple[float, float]:
    """
    (CPUs, GPUs) for each stage actor; checks at once that the cluster holds `k` of them in total (K stages, or
    with replicas every replica of every stage).
    """
    # train.device=cuda never trains on the CPU: wait (bounded) for GPUs; auto takes what the cluster has now.
    cpus, gpus = _wait_for_gpus(cfg, k) if cfg.device.startswith("cuda") and cfg.gpus_per_stage else _totals()
    per_gpu = _share(cfg.gpus_per_stage) if cfg.gpus_per_stage > 0 else cfg.gpus_per_stage
    if replicated and per_gpu == -1 and 0 < gpus < k and cfg.device != "cpu":
        # Sharing GPUs as below would put two replicas of a stage on one GPU, where NCCL refuses two ranks.
        raise ClusterError(f"train.replicas={cfg.replicas} asks for {k} stage replicas, one GPU each, but the cluster "
                           f"has {gpus:g} GPUs ({_nodes()}); lower train.replicas (or model.k) to fit {gpus:g} GPUs, "
                           f"or let the planner choose: train.plan=auto")
    if per_gpu == -1:
        per_gpu = 1.0 if gpus > 0 and cfg.device != "cpu" else 0.0
        if 0 < gpus < k and cfg.device != "cpu":
            # Each GPU takes the same whole number of stages, so the fractions always pack.
            whole = math.floor(gpus)
            per_gpu = _share(1.0 / math.ceil(k / whole) if whole >= 1 else gpus / k)
            log.warning("%d stages on %g GPU(s): stages share GPUs at %.3g GPU each (memory and compute shared); "
                        "K=%d needs %d GPUs for one stage each, or set train.gpus_per_stage yourself",
                        k, gpus, per_gpu, k, k)
    if cfg.device == "cpu" and cfg.gpus_per_stage == -1:
        per_gpu = 0.0  # an explicit train.gpus_per_stage still reserves GPUs; the stages compute on the CPU
    # train.cpus_per_stage=0 (the default): one CPU each, or K equal shares of a cluster with fewer CPUs than K.
    per_cpu = cfg.cpus_per_stage or min(1.0, cpus / k)
    asked = f"{k} {'stage replicas' if replicated else 'stages'} x ({per_cpu:g} CPU, {per_gpu:g} GPU)"
    if per_gpu * k > gpus + 1e-9:
        fit = f"train.gpus_per_stage={_share(gpus / k):g} to share them" if gpus else "train.device=cpu"
        raise ClusterError(f"asked for {asked} = {per_gpu * k:g} GPUs, but the cluster has {gpus:g} GPUs "
                           f"({_nodes()}); add GPUs, lower model.k, or set {fit}")
    if per_cpu * k > cpus + 1e-9:
        raise ClusterError(f"asked for {asked} = {per_cpu * k:g} CPUs, but the cluster has {cpus:g} "
                           f"({_nodes()}); lower train.cpus_per_stage (e.g. {max(cpus // k, 0.1):g}), or set it "
                           f"to 0 to share the cluster's CPUs")
    return per_cpu, per_gpu


def place_stages(cfg: TrainConfig, k: int, replicated: bool = False) -> tuple[PlacementGroup, float, float]:
    """Reserve one bundle per stage actor (replica); raise ClusterError if that does not happen within the timeout."""
    cpus, gpus = stage_resources(cfg, k, replicated)
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    placement = placement_group([dict(bundle) for _ in range(k)], strategy=cfg.placement.upper())
    ready, _ = ray.wait([placement.ready()], timeout=cfg.placement_timeout_s)
    if not ready:
        remove_placement_group(placement)
        hint = ("set train.placement=spread to use several nodes, or " if cfg.placement == "strict_pack" else "")
        raise ClusterError(
            f"could not place {k} stages x {bundle} with train.placement={cfg.placement} within "
            f"{cfg.placement_timeout_s:g} s; the cluster has {_nodes()}, and other jobs may hold part of it; "
            f"{hint}lower train.gpus_per_stage / train.cpus_per_stage, or raise train.placement_timeout_s"
        )
    log.info("placed %d stages x %s (%s)", k, bundle, cfg.placement)
    return placement, cpus, gpus


def bundle_order(group: PlacementGroup) -> list[int]:
    """
    The group's bundle indices with a node's bundles side by side, nodes in the order of their first bundle: the
    i-th stage actor (replica) takes the i-th, so neighbouring stages share a node and only the hops between two
    nodes' runs of stages cross the network. SPREAD deals bundles to the nodes in turn (on 2 x 8 GPUs every hop
    would cross it), and Ray promises no order for PACK either.
    """
    nodes = placement_group_table(group)["bundles_to_node_id"]
    first: dict[str, int] = {}
    for index in sorted(nodes):
        first.setdefault(nodes[index], index)
    return sorted(nodes, key=lambda index: (first[nodes[index]], index))
