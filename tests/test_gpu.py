"""
The GPU paths: what a CPU can check of them (always run), and `gpu`-marked tests that need CUDA (skipped without
it; `tools/gpu_check.sh` runs them on a GPU machine with `pytest -m gpu`).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

import distlocal.engine.planner as autosplit
import distlocal.model.e2e as e2e
from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.faults import StageOutOfMemory
from distlocal.engine.local import LocalExecutor
from distlocal.model import build_stages
from distlocal.model.balance import BlockCost
from distlocal.model.tiling import INDEX_LIMIT, index_tile
from distlocal.predict import Predictor

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- on the CPU ------------------------------------------------------------------------------------------------


def test_end_to_end_evaluation_runs_the_stem_in_tiles(make_cfg, slide, monkeypatch):
    """E2E eval_step goes through run_stem (tiled, as training does) and gives the whole network's output."""
    net = build_stages(make_cfg("model.mode=e2e", "model.backbone=resnet18", "model.split=balanced"), 2)[0]
    calls = []
    real = e2e.run_stem
    monkeypatch.setattr(e2e, "run_stem", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    _, probs, _ = net.eval_step(slide)
    assert calls == [slide.shape]
    with torch.no_grad():
        whole = torch.softmax(net.net.eval()(slide)[0], 1)[0]
    torch.testing.assert_close(probs, whole, rtol=1e-4, atol=1e-5)


def test_auto_split_profiles_under_the_training_precision(make_cfg, slide, monkeypatch):
    """model.split=auto with train.precision=bf16 profiles the blocks under bf16 autocast, as they will train."""
    seen = []
    monkeypatch.setattr(autosplit, "profile_blocks", lambda *a, **k: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))) or [BlockCost(i, 1.0, 0.1, 1.0)
                                                                                  for i in range(16)])
    autosplit.resolve_auto_split(make_cfg("model.split=auto", "model.k=2", "train.precision=bf16"), 2, slide)
    autosplit.resolve_auto_split(make_cfg("model.split=auto", "model.k=2"), 2, slide)
    assert seen == [(True, torch.bfloat16), (False, torch.bfloat16)]


def test_predict_tiles_stay_within_32_bit_indexing(make_cfg):
    """A tile's pixels times the most elements per input pixel stay under 2**31: 128 for stage 2's input here."""
    stages = build_stages(make_cfg("model.backbone=resnet18", "model.split=balanced", "model.k=2"), 2)
    predictor = Predictor.from_stages(make_cfg(), ["a", "b"], stages, torch.device("cpu"))
    assert index_tile([f for f, _ in predictor.parts], torch.device("cpu")) == INDEX_LIMIT // 128


# -- on a GPU --------------------------------------------------------------------------------------------------


def _gpu_cfg(manifest, tmp_path, *overrides):
    return load_config(None, [
        f"data.manifest={manifest}", f"run.dir={tmp_path}", "train.device=cuda", "model.backbone=resnet18",
        "model.k=4", "model.split=balanced", "train.accumulate=2", "model.rfr.patch_size=16",
        "train.lr_backbone=1e-3", "train.lr_aux=1e-3", "tracking.enabled=false", *overrides])


@pytest.fixture
def gpu_ray(no_shared_ray):
    """A local Ray that sees this machine's GPUs."""
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)


@pytest.mark.gpu
@cuda
def test_local_bf16_training_on_a_large_slide_with_fold_and_recompute(make_cfg):
    """K=4 bf16 on a 5 Mpx slide (tiled stem on the device), folded BatchNorm and recompute: finite, on the GPU."""
    cfg = make_cfg("train.device=cuda", "train.precision=bf16", "train.fold_batchnorm=true",
                   "train.recompute_activations=true", "model.k=4")
    stages = build_stages(cfg, 2, "cuda")
    x = torch.randn(1, 3, 2500, 2000)
    for stage in stages:
        x, metrics = stage.train_step(x, 1)
        assert x.device.type == "cuda"
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        assert metrics["peak_mem_mb"] > 0


@pytest.mark.gpu
@cuda
def test_ray_on_one_gpu_uses_cuda_ipc_and_matches_the_local_executor(gpu_ray, manifest, tmp_path):
    """K=4 at 0.25 GPU each: every hop is cuda_ipc, state comes back on the CPU, parameters equal the local run."""
    from distlocal.engine.ray_executor import RayExecutor

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = _gpu_cfg(manifest, tmp_path, "train.executor=ray", "train.gpus_per_stage=0.25", "train.max_inflight=1",
                   "train.activation_dtype=fp32", "train.transport=nccl")
    records = read_manifest(cfg.data.manifest).split("train")
    local = LocalExecutor(build_stages(cfg, 2, "cuda"))
    list(local.train(records, SlideLoader(cfg.data, True, cfg.train.seed), 0))
    remote = RayExecutor(cfg, 2)
    try:
        assert [h.transport for h in remote.hops] == ["cuda_ipc"] * 3
        list(remote.train(records, SlideLoader(cfg.data, True, cfg.train.seed), 0))
        states = remote.state_dicts()
    finally:
        remote.close()
    for ours, theirs in zip(states, local.state_dicts(), strict=True):
        for name, tensor in theirs["modules"].items():
            assert ours["modules"][name].device.type == "cpu"
            torch.testing.assert_close(ours["modules"][name], tensor.cpu(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
@cuda
def test_a_killed_stage_recovers_on_the_gpu(gpu_ray, manifest, tmp_path):
    """SIGKILL of a stage actor sharing the GPU: Ray restarts it on the GPU, the stages reload, the run completes."""
    from distlocal.engine.trainer import Trainer

    cfg = _gpu_cfg(manifest, tmp_path, "train.executor=ray", "train.gpus_per_stage=0.25", "train.epochs=2",
                   "train.checkpoint_every=1", "train.heatmaps=0", "train.transport=nccl")
    trainer = Trainer(cfg, tmp_path / "run")
    victim = trainer.executor.info[2]["pid"]
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=trainer.fit()), daemon=True)
    thread.start()
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert outcome["summary"]["completed"]
    assert len(outcome["summary"]["failures"]) == 1
    assert all(i["device"] == "cuda:0" for i in trainer.executor.info)
    assert trainer.executor.transport == "cuda_ipc"


@pytest.mark.gpu
@cuda
def test_out_of_memory_on_the_gpu_names_the_gpu(gpu_ray, manifest, tmp_path):
    """A forced CUDA OOM in stage 2 reaches the driver naming the CUDA device and its model."""
    from distlocal.engine.ray_executor import RayExecutor
    from tests.interrupt import failing_actor

    cfg = _gpu_cfg(manifest, tmp_path, "train.executor=ray", "train.gpus_per_stage=0.25")
    executor = RayExecutor(cfg, 2, actor_cls=failing_actor(1, torch.OutOfMemoryError("CUDA out of memory")))
    try:
        with pytest.raises(StageOutOfMemory, match=r"stage 2/4 ran out of memory on cuda:0 \(.+\)"):
            list(executor.train(read_manifest(cfg.data.manifest).split("train")[:1],
                                SlideLoader(cfg.data, True, 0), 0))
    finally:
        executor.close()


@pytest.mark.gpu
@cuda
def test_predict_whole_equals_tiled_on_cuda(make_cfg):
    """On CUDA the tiled forward gives the whole slide's probabilities (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = make_cfg("train.device=cuda", "model.backbone=resnet18", "model.split=balanced", "model.k=2")
    stages = build_stages(cfg, 2, "cuda")
    x = torch.randn(1, 3, 900, 700)
    whole = Predictor.from_stages(cfg, ["a", "b"], stages, torch.device("cuda"))
    whole.max_tile_pixels = None
    tiled = Predictor.from_stages(cfg, ["a", "b"], stages, torch.device("cuda"))
    tiled.max_tile_pixels = 300 * 300
    torch.testing.assert_close(tiled(x)["probs"], whole(x)["probs"], rtol=1e-4, atol=1e-5)
