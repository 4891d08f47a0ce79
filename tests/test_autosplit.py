"""model.split=auto: the profiled cut minimises the slowest stage and is recorded in the run's config."""

import itertools
import random
import time
from pathlib import Path

import pytest

from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.engine.planner import profile_on_cluster
from distlocal.engine.trainer import Trainer
from distlocal.model.balance import BlockCost, best_split
from distlocal.slides import write_synthetic_dataset


def _costs(seconds, classifier=0.0):
    return [BlockCost(i, s, classifier, 0.0) for i, s in enumerate(seconds)]


def test_best_split_moves_a_heavy_block_into_its_own_stage():
    """One slow block gets a stage of its own; the cheap blocks share the other."""
    sizes, stage_costs = best_split(_costs([1, 1, 1, 1, 4]), 2)
    assert sizes == [4, 1]
    assert stage_costs == [4, 4]


@pytest.mark.parametrize("seed", range(5))
def test_best_split_equals_brute_force(seed):
    """The dynamic programme finds the same slowest-stage cost as trying every contiguous cut."""
    rng = random.Random(seed)
    costs = [BlockCost(i, rng.uniform(0.1, 3), rng.uniform(0, 1), 0.0) for i in range(8)]
    sizes, stage_costs = best_split(costs, 3)
    brute = min(
        max(sum(c.seconds for c in costs[a:b]) + costs[b - 1].classifier_seconds
            for a, b in zip((0, *cuts), (*cuts, 8), strict=True))
        for cuts in itertools.combinations(range(1, 8), 2)
    )
    assert max(stage_costs) == pytest.approx(brute)
    assert sum(sizes) == 8
    assert len(sizes) == 3


def test_explicit_cut_must_cover_the_backbone():
    """A hand-written cut that does not add up to the backbone's blocks names the key and the count."""
    with pytest.raises(ConfigError, match=r"model\.blocks_per_stage=\[2, 2\].*resnet18's 8 residual blocks"):
        load_config(None, ["model.backbone=resnet18", "model.k=2", "model.split=auto", "model.blocks_per_stage=[2,2]"])


def test_trainer_profiles_and_records_the_cut(tmp_path, caplog):
    """A split=auto run profiles on a real slide, logs the costs, and writes the cut into its config."""
    manifest = write_synthetic_dataset(tmp_path / "slides", slides=4, classes=2, size=(96, 96), seed=0)
    cfg = load_config(None, [f"data.manifest={manifest}", "train.device=cpu", "model.backbone=resnet18", "model.k=3",
                             "model.split=auto", "train.epochs=1", "model.rfr.patch_size=16", "tracking.enabled=false"])
    caplog.set_level("INFO")
    trainer = Trainer(cfg, tmp_path / "run")
    sizes = load_config(tmp_path / "run" / "config.yaml").model.blocks_per_stage
    assert len(sizes) == 3
    assert sum(sizes) == 8
    assert [len(s.spec.blocks) for s in trainer.executor.stages] == sizes
    assert "chosen blocks per stage" in caplog.text


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped by its raylet, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_the_profiling_task_does_not_keep_its_worker(local_ray, slide):
    """The Ray task of split=auto / plan=auto exits after profiling: its CUDA context and cache go with it."""
    cfg = load_config(None, ["train.executor=ray", "train.device=cpu", "model.backbone=resnet18", "model.k=2",
                             "model.rfr.patch_size=24", "train.cpus_per_stage=1"])
    costs, _, pid = profile_on_cluster(cfg, 2, slide)
    assert len(costs) == 8  # resnet18's residual blocks
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), f"the profiling task's worker {pid} is still running"
