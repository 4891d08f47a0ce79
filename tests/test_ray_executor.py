"""The Ray executor on a real local Ray: parity with the local executor, overlap, faults, placement errors."""

import dataclasses
import json
import os
import signal
import sys
import time

import pytest
import ray
import torch
import torchvision

from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.checkpoint import load_checkpoint
from distlocal.engine.faults import ClusterError, RunFailed
from distlocal.engine.loader_plan import auto_loaders
from distlocal.engine.local import LocalExecutor
from distlocal.engine.ray_executor import RayExecutor
from distlocal.engine.trainer import Trainer
from distlocal.model import build_stages
from tests.harness import damaged_cache
from tests.interrupt import fit_and_interrupt
from tests.tiny_run import tiny_run


def _cfg(manifest, tmp_path, *overrides):
    # The tiny run on Ray; "2 stages" in the messages below is its model.k, the chunks of checkpoint_every its
    # accumulate.
    return tiny_run(manifest, tmp_path, "train.executor=ray", "model.k=2", "train.accumulate=2", *overrides)


def _train_records(cfg):
    return read_manifest(cfg.data.manifest).split("train")


def test_workers_run_the_drivers_interpreter_in_place(local_ray):
    """Ray's workers use this environment as it is, not a copy `uv run` builds for every Ray session."""

    @ray.remote(num_cpus=0)
    def interpreter() -> str:
        import sys

        return sys.executable

    assert ray.get(interpreter.remote()) == sys.executable


# K=3 has a middle stage; gloo sends stage to stage directly. Hops through the object store are compared with the
# local executor by test_ray_run_stopped_and_resumed_equals_local_straight_through (K=2).
def test_one_slide_in_flight_matches_the_local_executor(local_ray, actor_threads, manifest, tmp_path):
    """
    With max_inflight 1 the actors end with the same parameters as the single-process executor. Then a pass read by
    region from a cache whose second entry has a damaged tile (data.on_error=skip): stage 1 sends its marker over
    the gloo hops instead of an activation (engine/unread.py), and both executors skip that slide alike.
    """
    cfg = _cfg(manifest, tmp_path, "model.k=3", "train.max_inflight=1", "train.transport=gloo")
    records = _train_records(cfg)
    cache = damaged_cache(manifest, tmp_path / "cache", records[1].slide_id)
    unread = dataclasses.replace(cfg.data, cache_dir=str(cache), on_error="skip")
    local = LocalExecutor(build_stages(cfg, 2, "cpu"))
    local_metrics = [m for _, m in local.train(records, SlideLoader(cfg.data, True, cfg.train.seed), 0)]
    local_unread = SlideLoader(unread, True, cfg.train.seed, by_region=True)
    assert [s for s, _ in local.train(records[:3], local_unread, 1)] == [records[0].slide_id, records[2].slide_id]
    remote = RayExecutor(cfg, 2)
    assert remote.transport == "gloo"
    assert {info["activation_dtype"] for info in remote.info} == {"float32"}  # train.precision=fp32 sends fp32
    try:
        remote_metrics = [m for _, m in remote.train(records, SlideLoader(cfg.data, True, cfg.train.seed), 0)]
        remote_unread = SlideLoader(unread, True, cfg.train.seed, by_region=True)
        assert [s for s, _ in remote.train(records[:3], remote_unread, 1)] == [records[0].slide_id,
                                                                              records[2].slide_id]
        remote_states = remote.state_dicts()
    finally:
        remote.close()
    assert remote_unread.skipped == local_unread.skipped
    assert [s.slide_id for s in remote_unread.skipped] == [records[1].slide_id]
    assert [m[-1]["loss"] for m in remote_metrics] == pytest.approx([m[-1]["loss"] for m in local_metrics], rel=1e-4)
    for ours, theirs in zip(remote_states, local.state_dicts(), strict=True):
        assert ours["optim"]["steps"] == theirs["optim"]["steps"] > 0
        for name, tensor in theirs["modules"].items():
            torch.testing.assert_close(ours["modules"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _fit_and_kill(trainer, stage: int, run_dir) -> dict:
    """Run trainer.fit(), SIGKILL stage `stage`'s actor once training has logged two lines; return the outcome."""
    victim = trainer.executor.info[stage]["pid"]
    return fit_and_interrupt(trainer, run_dir, 2, lambda: os.kill(victim, signal.SIGKILL))


def test_killed_stage_restarts_from_the_checkpoint_without_its_weights_file_and_the_run_completes(
        local_ray, manifest, tmp_path):
    """
    SIGKILL of a stage actor mid-epoch: Ray restarts it, every stage reloads, the run finishes and says so. The
    restarted stage's node has no model.weights file (nor, for imagenet, internet): it rebuilds from the checkpoint.
    """
    # One run for both claims (a restart, and a restart without the weights file): each costs a Ray training.
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = _cfg(manifest, tmp_path, "train.epochs=2", f"model.weights={weights}", "train.checkpoint_every=1",
               "train.max_inflight=2")
    trainer = Trainer(cfg, tmp_path / "run")
    victim = trainer.executor.info[1]["pid"]

    def lose_the_node():
        weights.unlink()  # the node it restarts on has no such file
        os.kill(victim, signal.SIGKILL)

    outcome = fit_and_interrupt(trainer, tmp_path / "run", 2, lose_the_node)
    assert "summary" in outcome, outcome.get("error")
    result = outcome["summary"]
    assert result["completed"]
    assert len(result["failures"]) == 1
    assert "Actor" in result["failures"][0]["error"]  # ActorDiedError / ActorUnavailableError
    assert result["slides_seen"] == 2 * len(_train_records(cfg))  # replayed from the checkpoint, none lost
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failures"] == result["failures"]


def test_failures_beyond_max_restarts_end_the_run_with_checkpoints_intact(local_ray, manifest, tmp_path):
    """With train.max_restarts=0 a killed stage ends the run with a message; the last checkpoint still loads."""
    cfg = _cfg(manifest, tmp_path, "train.epochs=3", "train.checkpoint_every=1", "train.max_restarts=0")
    outcome = _fit_and_kill(Trainer(cfg, tmp_path / "run"), 0, tmp_path / "run")
    assert isinstance(outcome.get("error"), RunFailed)
    assert "train.max_restarts=0" in str(outcome["error"])
    assert "--resume" in str(outcome["error"])
    assert len(load_checkpoint(tmp_path / "run" / "checkpoints" / "last").stages) == 2


def test_more_gpus_than_the_cluster_has_fails_at_once(local_ray, manifest, tmp_path):
    """Asking for GPUs on a CPU-only cluster fails fast, naming what was asked and what exists."""
    cfg = _cfg(manifest, tmp_path, "train.device=auto", "train.gpus_per_stage=1")
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"asked for 2 stages x \(1 CPU, 1 GPU\) = 2 GPUs.*has 0 GPUs"):
        RayExecutor(cfg, 2)
    assert time.monotonic() - start < 10


def test_unplaceable_stages_fail_within_the_timeout(local_ray, manifest, tmp_path):
    """When other work holds the CPUs, placement gives up after train.placement_timeout_s with a clear message."""
    hog = ray.util.placement_group([{"CPU": 5}])
    ray.get(hog.ready())
    try:
        cfg = _cfg(manifest, tmp_path, "train.placement_timeout_s=2")
        start = time.monotonic()
        with pytest.raises(ClusterError, match=r"could not place 2 stages.*within 2 s"):
            RayExecutor(cfg, 2)
        assert time.monotonic() - start < 15
    finally:
        ray.util.remove_placement_group(hog)


def test_ray_run_stopped_and_resumed_equals_local_straight_through(local_ray, actor_threads, manifest, tmp_path,
                                                                    caplog):
    """
    A Ray run stopped mid-epoch and resumed with --resume ends where an uninterrupted local run ends. Its first part
    has train.loaders=auto: the count, and the read and stage times it came from, are logged and recorded.
    """
    caplog.set_level("INFO")
    stopped = Trainer(_cfg(manifest, tmp_path, "train.max_inflight=1", "train.max_slides=3", "train.loaders=auto"),
                      tmp_path / "ray")
    summary = stopped.fit()
    assert not summary["completed"]
    chosen = json.loads((tmp_path / "ray" / "summary.json").read_text())["loader_plan"]
    assert chosen["loaders"] == auto_loaders(chosen["stage_s"], chosen["read_s"], chosen["cpus"])
    assert load_config(tmp_path / "ray" / "config.yaml").train.loaders == chosen["loaders"]  # a resume keeps it
    assert len(stopped.executor.feed.actors) == chosen["loaders"]
    assert chosen["slides"] == 3
    assert chosen["read_s"] > 0
    assert chosen["stage_s"] > 0
    assert chosen["cpus"] == 6 - 2  # the shared Ray's CPUs less one per stage
    assert f"train.loaders=auto: {chosen['loaders']} loader(s); one reads a slide in" in caplog.text
    assert "the pipeline as configured: blocks per stage [4, 4], replicas [1, 1]" in caplog.text
    resumed = Trainer(_cfg(manifest, tmp_path, "train.max_inflight=1"), tmp_path / "ray", resume=True)
    assert resumed.fit()["completed"]
    Trainer(_cfg(manifest, tmp_path, "train.executor=local"), tmp_path / "local").fit()
    # The end-of-run report (best checkpoint on the test split, attention heatmaps) agrees across executors too.
    reports = [json.loads((tmp_path / run / "test_metrics.json").read_text()) for run in ("ray", "local")]
    for ray_stage, local_stage in zip(reports[0]["stages"], reports[1]["stages"], strict=True):
        assert ray_stage == pytest.approx(local_stage, abs=1e-4, nan_ok=True)
    heatmaps = [sorted(p.name for p in (tmp_path / run / "plots" / "attention").glob("*.png"))
                for run in ("ray", "local")]
    assert heatmaps[0] == heatmaps[1]
    assert len(heatmaps[0]) == min(3, len(read_manifest(manifest).split("valid")))
    ours = load_checkpoint(tmp_path / "ray" / "checkpoints" / "last").stages
    theirs = load_checkpoint(tmp_path / "local" / "checkpoints" / "last").stages
    for a, b in zip(ours, theirs, strict=True):
        for name, tensor in b["modules"].items():
            torch.testing.assert_close(a["modules"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_an_unwritable_run_dir_fails_at_start_naming_it(local_ray, manifest, tmp_path):
    """A run.dir the driver cannot create (a cluster's /shared path on another machine) stops the start clearly."""
    cfg = _cfg(manifest, tmp_path, "run.dir=/proc/distlocal/runs")
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"cannot write to run.dir /proc/distlocal/runs .*storage every node shares"):
        RayExecutor(cfg, 2)
    assert time.monotonic() - start < 10  # before any actor starts
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())  # nothing held


def test_device_cuda_on_a_cluster_without_gpus_waits_then_fails_naming_the_wait(local_ray, manifest, tmp_path):
    """train.device=cuda never trains on the CPU: with no GPU in the cluster it waits (bounded), then says why."""
    cfg = _cfg(manifest, tmp_path, "train.device=cuda", "train.placement_timeout_s=2")
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"train.device=cuda needs GPUs, but the cluster has 0 GPUs after waiting "
                                           r"2 s .*train.placement_timeout_s"):
        RayExecutor(cfg, 2)
    assert 2 <= time.monotonic() - start < 12


def test_a_stage_asked_for_cuda_without_gpu_ids_refuses(local_ray, manifest, tmp_path):
    """train.device=cuda with train.gpus_per_stage=0: the actors get no GPU, and refuse rather than use the CPU."""
    with pytest.raises(ClusterError, match=r"stage \d .*train.device=cuda but Ray gave it no GPU .*gpus_per_stage"):
        RayExecutor(_cfg(manifest, tmp_path, "train.device=cuda", "train.gpus_per_stage=0"), 2)


def _first_send_fails_actor() -> type:
    """Stage 2 cannot take stage 1's first gloo tensor (a firewall, a wrong interface), and has a long call to run."""
    from distlocal.engine.actor import StageActor

    class FirstSendFails(StageActor):
        def probe_receive(self, x):
            raise RuntimeError("Connection refused: gloo could not connect to 10.0.0.7:41234")

        def busy(self, seconds: float) -> None:
            time.sleep(seconds)

    return FirstSendFails


def test_a_failed_first_send_falls_back_a_lost_stage_times_out_and_close_does_not_wait_for_busy_stages(
        local_ray, manifest, tmp_path):
    """
    The start sends one tensor per gloo hop: its failure is the hop's fallback cause, not a stage killed at the first
    slide. Recovery waits train.recovery_timeout_s for a stage that does not come back, then names the setting.
    close() ends the actors before it destroys the group, so a stage in a long call does not hold it up.
    """
    cfg = _cfg(manifest, tmp_path, "train.transport=gloo", "train.max_restarts=0", "train.recovery_timeout_s=2")
    executor = RayExecutor(cfg, 2, actor_cls=_first_send_fails_actor())
    try:
        assert executor.transport is None
        assert executor.hops[0].transport == "object_store"
        assert "first gloo send failed at start (RuntimeError: Connection refused" in executor.hops[0].why
        assert "GLOO_SOCKET_IFNAME" in executor.hops[0].why
        ray.kill(executor.actors.all[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(ClusterError, match=r"stage 2 did not come back within 2 s .*train.recovery_timeout_s"):
            executor.recover(tmp_path / "checkpoints" / "last")
        assert time.monotonic() - start < 10
        busy = executor.actors.all[0].busy.remote(120)
    finally:
        start = time.monotonic()
        executor.close()
    assert time.monotonic() - start < 20
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(busy, timeout=20)
