"""Replicas per stage (train.replicas) on a real local Ray with gloo: they learn what one stage learns."""

import copy
import dataclasses
import json
import os
import signal
import threading

import pytest
import ray
import torch

from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine import planner as autosplit
from distlocal.engine.actor import StageActor
from distlocal.engine.checkpoint import load_checkpoint
from distlocal.engine.faults import ClusterError, StageOutOfMemory
from distlocal.engine.local import LocalExecutor
from distlocal.engine.ray_executor import RayExecutor
from distlocal.engine.replicas import ReplicaGroup, Schedule
from distlocal.engine.trainer import Trainer
from distlocal.model import build_stages
from distlocal.model.balance import BlockCost
from distlocal.model.optim import LocalOptimizer
from tests.harness import damaged_cache
from tests.interrupt import fit_and_interrupt
from tests.tiny_run import tiny_run

# R replicas sum the same per-slide gradients as one stage, in another order (gloo's ring against one running
# .grad). In float64 that reordering is ~1e-16 relative; 1e-9 is far above it on any CPU and far below a real
# difference (a slide counted twice or lost, a wrong divisor: relative 1e-2 or more).
EXACT = {"rtol": 1e-9, "atol": 1e-11}
# A streamed stage sums its gradients tile by tile: rounding-sized differences from the whole-slide step (~1e-16
# relative), which AdamW's first steps scale by up to lr / eps (1e5) where a gradient is near eps: ~1e-10 after a
# few steps. A real error (a position counted twice or not at all) moves a weight by ~lr = 1e-3 per step.
STREAMED = {"rtol": 1e-6, "atol": 1e-8}


def _cfg(manifest, tmp_path, *overrides):
    # Windows of 3 slides: two replicas split one unevenly (2 + 1), which the equalities below must survive.
    return tiny_run(manifest, tmp_path, "train.executor=ray", "train.accumulate=3", *overrides)


def _float64_actor() -> type:
    """A stage actor computing (and sending activations) in float64, like the exactness tests' local stages."""

    # Made in a function: Ray then ships the class by value (workers cannot import a test module by name).
    class Float64Actor(StageActor):
        def __init__(self, *args):
            super().__init__(*args)
            self.stage.modules.double()
            self.activation_dtype = torch.float64

        def fail_steps(self) -> None:
            """From now on this stage's optimizer step runs out of memory (the all-reduce's flat buffer, say)."""
            def step(reduce=None):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

            self.stage.optim.step = step

    return Float64Actor


def _float64(stages):
    for stage in stages:
        stage.modules.double()
    return stages


def _same_state(ours: dict, theirs: dict, what: str, **tolerance) -> None:
    assert ours["optim"]["steps"] == theirs["optim"]["steps"], f"{what}: optimizer steps"
    assert ours["optim"]["accumulated"] == theirs["optim"]["accumulated"], f"{what}: slides of the open window"
    for name, tensor in theirs["modules"].items():
        if name.startswith("rfr.") and ("running_" in name or "num_batches" in name):
            continue  # RFR's BatchNorm statistics see one replica's slides; no forward pass uses them
        if name == "rfr.reconstruct.1.bias":
            # The bias of the conv just before RFR's BatchNorm: BatchNorm subtracts any per-channel constant, so its
            # gradient is zero but for rounding (~1e-17), and AdamW scales that noise to a step of up to lr.
            continue
        torch.testing.assert_close(ours["modules"][name], tensor, **tolerance, msg=f"{what}: {name}")
    for i, (a, b) in enumerate(zip(ours["optim"]["pending_grads"], theirs["optim"]["pending_grads"], strict=True)):
        assert (a is None) == (b is None), f"{what}: pending gradient {i} present in one only"
        if b is not None:
            torch.testing.assert_close(a, b, **tolerance, msg=f"{what}: pending gradient {i}")


def test_schedule_routes_in_turn_within_a_window_and_closes_it():
    """Window position mod R picks the replica; the A-th slide closes the window; a resumed fill continues."""
    schedule = Schedule([2, 1, 3], accumulate=4)
    routes = [schedule.next() for _ in range(5)]
    assert [r.replicas for r in routes] == [(0, 0, 0), (1, 0, 1), (0, 0, 2), (1, 0, 0), (0, 0, 0)]
    assert [r.closes for r in routes] == [False, False, False, True, False]
    assert Schedule([2, 1, 3], accumulate=4, filled=3).next() == routes[3]


def test_an_empty_replica_adds_zeros_and_an_unused_weight_is_not_decayed(make_cfg):
    """
    Two replicas over a real gloo group (threads): one trains both slides of a window, the other none. Their step
    equals one optimizer's over the same slides, and a parameter no slide reached keeps its value (no decay).
    """
    cfg = make_cfg("train.accumulate=2", "train.weight_decay=0.1").train
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 1).double(), "unused": torch.nn.Linear(4, 1).double()})
    copies = [copy.deepcopy(model) for _ in range(3)]
    optims = [LocalOptimizer(m, torch.nn.Identity(), cfg) for m in copies]
    slides = [torch.randn(1, 4, dtype=torch.float64) for _ in range(2)]
    for x in slides:
        optims[0].backward(copies[0]["used"](x).square().sum())  # one stage
        optims[1].add(copies[1]["used"](x).square().sum())  # replica 0; replica 1 (optims[2]) gets none
    store, port = ReplicaGroup.host_store("127.0.0.1", 2, 30)
    stepped = {}

    def replica(rank):
        group = ReplicaGroup(rank, 2, ("127.0.0.1", port), 1, "gloo", 30, store if rank == 0 else None)
        stepped[rank] = optims[1 + rank].step(group.reduce_params(optims[1 + rank].params()))

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert stepped == {0: True, 1: True}, "both replicas step the window"
    for name, tensor in copies[0].state_dict().items():
        for rank in (0, 1):
            torch.testing.assert_close(copies[1 + rank].state_dict()[name], tensor, **EXACT, msg=f"{rank}: {name}")
    torch.testing.assert_close(copies[2]["unused"].weight, model["unused"].weight, rtol=0, atol=0)


def test_bad_replica_settings_name_the_key_and_the_fix():
    """A list of the wrong length, zero replicas, the local executor, a direct transport: each says what to set."""
    with pytest.raises(ConfigError, match=r"train.replicas=\[2, 1\] gives 2 counts for K=4 stages.*a list of 4"):
        load_config(None, ["train.executor=ray", "model.k=4", "train.replicas=[2,1]"])
    with pytest.raises(ConfigError, match=r"at least 1 replica"):
        load_config(None, ["train.executor=ray", "model.k=2", "train.replicas=[0,1]"])
    with pytest.raises(ConfigError, match=r"needs train.executor=ray"):
        load_config(None, ["train.replicas=2"])
    with pytest.raises(ConfigError, match=r"train.transport=gloo .*set train.transport=object_store"):
        load_config(None, ["train.executor=ray", "train.replicas=2", "train.transport=gloo"])


def test_plan_auto_records_its_cut_and_replicas_in_a_valid_config(make_cfg, slide, monkeypatch):
    """train.plan=auto on 3 devices: the plan's cut and replicas are in the resolved (validated) config."""
    # The profile (a Ray task on a stage's resources) is what test_planner covers; here its plumbing only.
    profile = [BlockCost(b, 2.0 if b < 4 else 1.0, 0.0, 0.0) for b in range(8)]
    monkeypatch.setattr(autosplit, "_profile_remote", lambda *a: (profile, float("inf")))
    cfg, plan = autosplit.resolve_plan(make_cfg("train.executor=ray", "model.backbone=resnet18", "model.k=2",
                                                "model.split=auto", "train.plan=auto", "train.gpus=3",
                                                "train.accumulate=8"), 2, slide)
    assert (cfg.model.blocks_per_stage, cfg.train.replicas) == (plan.blocks_per_stage, plan.replicas)
    assert sum(plan.replicas) == 3, f"a third device halves one stage's time: {plan}"
    assert cfg.train.plan == "manual", "a resumed run keeps the plan its config records"
    assert plan.slides_per_s == pytest.approx(1 / 4.0)
    with pytest.raises(ConfigError, match=r"train.plan=auto .* needs train.executor=ray"):
        make_cfg("train.plan=auto")


def test_more_replicas_than_gpus_fail_at_once(local_ray, manifest, tmp_path):
    """Replicas at one GPU each on a cluster without GPUs: the start fails before any actor, naming the count."""
    with pytest.raises(ClusterError, match=r"asked for 3 stage replicas x \(1 CPU, 1 GPU\) = 3 GPUs.*has 0 GPUs"):
        RayExecutor(_cfg(manifest, tmp_path, "train.replicas=[2,1]", "train.device=auto", "train.gpus_per_stage=1"), 2)


def test_k4_replicas_equal_one_stage_overlap_and_keep_slide_order(local_ray, actor_threads, manifest, tmp_path):
    """
    K=4, stage 2 in 2 replicas, accumulate 3 over 8 slides (two windows and an open one of 2): the same parameters,
    optimizer steps and pending gradients as one stage per stage (float64); slides come back in order; the two
    replicas of stage 2 work at the same time. Then 4 slides read by region from a cache whose second entry has a
    damaged tile (stage 1 fails on it after the driver routed it into stage 2's window, data.on_error=skip): it is
    skipped, and every stage counts it as an empty slot of that window, so all stages have stepped the same windows.
    Last, an out-of-memory in the replicas' optimizer step is reported as such (stage, replica, device, window), not
    as a failed all-reduce to recover from.
    """
    cfg = _cfg(manifest, tmp_path, "model.k=4", "train.replicas=[1,2,1,1]", "train.max_inflight=6")
    records = read_manifest(manifest).split("train")
    cache = damaged_cache(manifest, tmp_path / "cache", records[1].slide_id)
    local = LocalExecutor(_float64(build_stages(cfg, 2, "cpu")))
    list(local.train(records, SlideLoader(cfg.data, True, cfg.train.seed), 0))
    executor = RayExecutor(cfg, 2, actor_cls=_float64_actor())
    try:
        results = list(executor.train(records, SlideLoader(cfg.data, True, cfg.train.seed), 0))
        traces = executor.traces()
        states = executor.state_dicts()
        unread = SlideLoader(dataclasses.replace(cfg.data, cache_dir=str(cache), on_error="skip"), True,
                             cfg.train.seed, by_region=True)
        trained = [slide for slide, _ in executor.train(records[:4], unread, 1)]
        assert trained == [records[i].slide_id for i in (0, 2, 3)]
        assert [s.slide_id for s in unread.skipped] == [records[1].slide_id]
        # 8 + 4 slots: windows 3 (closed by the first slide) and 4 (the unread slide's) stepped in every stage
        assert [(s["optim"]["steps"], s["optim"]["accumulated"]) for s in executor.state_dicts()] == [(4, 0)] * 4
        ray.get([replica.fail_steps.remote() for replica in executor.actors.stages[1]])
        with pytest.raises(StageOutOfMemory, match=r"stage 2/4 replica [12]/2 ran out of memory on cpu \(cpu\) on "
                                                   r"\S+ in the optimizer step of window 5 .*4.00 GiB"):
            list(executor.train(records[:3], SlideLoader(cfg.data, True, cfg.train.seed), 2))  # window 5 whole
    finally:
        executor.close()
    assert [slide for slide, _ in results] == [r.slide_id for r in records], "results in slide order"
    assert [int(m[1]["replica"]) for _, m in results] == [0, 1, 0] * 2 + [0, 1], "stage 2's slides, in turn"
    assert len(records) % cfg.train.accumulate, "the manifest must leave an open window for this test"
    for i, (ours, theirs) in enumerate(zip(states, local.state_dicts(), strict=True)):
        _same_state(ours, theirs, f"stage {i + 1}", **EXACT)
    first, second = [[(s, e) for kind, _, s, e in trace if kind == "train"] for trace in traces[1:3]]
    overlap = any(s1 < e2 and s2 < e1 for s1, e1 in first for s2, e2 in second)
    assert overlap, f"the replicas of stage 2 never trained at the same time: {first} {second}"
    assert [kind for kind, *_ in traces[1]].count("step") == 2, "two complete windows: two steps per replica"


def _float64_executors(cfg, num_classes):
    """The trainer's executors in float64 (the exactness claim below): the real Ray and local executors."""
    if cfg.train.executor == "ray":
        return RayExecutor(cfg, num_classes, actor_cls=_float64_actor())
    return LocalExecutor(_float64(build_stages(cfg, num_classes, "cpu")))


def test_killed_replica_recovers_and_resume_with_one_replica_equals_a_straight_run(local_ray, actor_threads,
                                                                                  manifest, tmp_path, monkeypatch):
    """
    K=2, stage 1 in 2 replicas, checkpoints every step: a SIGKILLed replica ends its group, the pipeline restarts
    and replays, the run stops at train.max_slides with a window open; resumed with one replica per stage it ends
    where a straight local run ends (float64), and the metrics carry each replica's step and wait times.
    The Ray run streams its stages (model.stream=on, tiles of 48 px on 96 px slides: 4 tiles at stage 1) and the
    straight run does not: streaming, replicas, recovery and resume together change nothing that training learns.
    """
    monkeypatch.setattr("distlocal.engine.trainer.make_executor", _float64_executors)
    common = ["train.checkpoint_every=1", "train.heatmaps=0"]
    streamed = ["model.stream=on", "model.stream_tile=48"]
    run = tmp_path / "ray"
    stopped = Trainer(_cfg(manifest, tmp_path, *common, *streamed, "train.replicas=[2,1]", "train.max_slides=7",
                           "train.collective_timeout_s=60"), run)
    victim = next(i["pid"] for i in stopped.executor.info if i["stage"] == 1 and i["replica"] == 1)
    outcome = fit_and_interrupt(stopped, run, 1, lambda: os.kill(victim, signal.SIGKILL))
    summary = outcome.get("summary")
    assert summary is not None, f"the run failed: {outcome.get('error')!r}"
    assert len(summary["failures"]) == 1, f"one failure survived: {summary['failures']}"
    assert summary["slides_seen"] == 7, "stopped at train.max_slides, no slide lost or repeated"
    assert not summary["completed"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("stage1/replica1/step_s" in line and "stage1/replica0/wait_s" in line for line in lines), \
        "per-replica step and wait times"
    assert not any("stage2/replica0/step_s" in line for line in lines), "an unreplicated stage has no replica series"

    resumed = Trainer(_cfg(manifest, tmp_path, *common, *streamed, "train.replicas=1"), run, resume=True)
    assert resumed.fit()["completed"]
    Trainer(_cfg(manifest, tmp_path, *common, "train.executor=local"), tmp_path / "local").fit()
    ours = load_checkpoint(run / "checkpoints" / "last").stages
    theirs = load_checkpoint(tmp_path / "local" / "checkpoints" / "last").stages
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _same_state(a, b, f"stage {i + 1}", **STREAMED)
