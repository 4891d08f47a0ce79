"""model.stream=auto and model.stream_tile=auto: decided per stage and per slide from a measured working set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.model import build_stage, build_stages
from distlocal.model.budget import GB, SavedTensors, _probe, state_bytes, working_set

SMALL = ("model.backbone=resnet18", "model.k=2", "model.split=balanced", "model.rfr.patch_size=16")
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _slide(height: int, width: int) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_saved_tensors_peak_falls_as_backward_frees():
    """Two graphs in turn: total counts both, peak only the larger, and nothing is held after backward."""
    a, b, c = torch.randn(256, 256, requires_grad=True), torch.randn(256, 256), torch.randn(256, 128)
    with SavedTensors() as saved:
        (a @ b).sum().backward()
        (a @ c).sum().backward()
    assert saved.total == (256 * 256 + 256 * 128) * 4  # a's gradient needs b, then c
    assert saved.peak == 256 * 256 * 4
    assert saved.now == 0


def test_auto_streams_the_slides_and_stages_whose_whole_step_does_not_fit(make_cfg):
    """
    train.memory_gb between stage 1's measured whole-slide steps on a small and a large slide: stage 1 streams the
    large one only; stage 2, whose weights and optimizer state alone exceed the budget, streams both.
    """
    small, large = (96, 96), (288, 240)
    probe = build_stage(make_cfg(*SMALL), 2, 0)
    work = working_set(probe)
    budget = (work.whole(small[0] * small[1]) + work.whole(large[0] * large[1])) / 2
    # the measured whole-slide steps themselves sit on either side of the budget, not only the arithmetic
    state = sum(state_bytes([probe.modules]).values())
    assert _probe(probe, 96) + state < budget < _probe(probe, 264) + state
    stages = build_stages(make_cfg(*SMALL, "model.stream=auto", "model.stream_tile=192",
                                   f"train.memory_gb={budget / GB}"), 2)
    assert stages[0].streaming.limit == pytest.approx(work.limit(budget), abs=1)  # GB as a decimal: rounding
    assert stages[1].streaming.limit == 0  # 0.28 GB of AdamW state and weights: no slide fits
    for size, first in ((small, 0.0), (large, 1.0)):
        x, m1 = stages[0].train_step(_slide(*size), 1)
        _, m2 = stages[1].train_step(x, 1)
        assert (m1["streamed"], m2["streamed"]) == (first, 1.0), size


def test_auto_tile_fits_the_budget(make_cfg):
    """stream_tile=auto: the tile fitted to train.memory_gb trains a slide of several tiles within the budget."""
    budget = 0.1 * GB
    stage = build_stage(make_cfg(*SMALL, "model.stream=on", "model.stream_tile=auto", "train.memory_gb=0.1"), 2, 0)
    tile = stage.streaming.tile
    assert stage.streaming.limit is None  # on: every slide streams
    assert 48 <= tile < 420
    assert tile % stage.spec.out_stride == 0
    x = _slide(600, 420)  # 2 x 2 tiles or more
    params = {p.untyped_storage().data_ptr() for p in stage.modules.parameters()}
    with SavedTensors(exclude=params) as saved:
        _, metrics = stage.train_step(x, 1)
    assert metrics["streamed"] == 1.0
    measured = saved.peak + sum(state_bytes([stage.modules]).values())
    assert measured <= budget


def test_auto_tile_that_cannot_fit_names_the_key():
    """A budget below the stage's weights and optimizer state: the error names the key and the fix."""
    with pytest.raises(ConfigError, match=r"model\.stream_tile=auto: stage 1.*raise train\.memory_gb"):
        build_stage(load_config(None, [*SMALL, "train.device=cpu", "model.stream=on", "model.stream_tile=auto",
                                       "train.memory_gb=0.001"]), 2, 0)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_stream_auto_alone_resolves_on_every_shipped_config(path):
    """--set model.stream=auto (and model.stream_tile=auto) alone gives a whole config on every shipped config."""
    assert load_config(path, ["model.stream=auto"]).model.stream == "auto"
    assert load_config(path, ["model.stream_tile=auto"]).model.stream_tile == "auto"


def test_stream_auto_alone_trains_on_the_demo_config():
    """The demo config with model.stream=auto: each stage probed; a small slide fits the host, so nothing streams."""
    cfg = load_config(CONFIGS[0].with_name("demo.yaml"), ["model.stream=auto", "train.device=cpu"])
    stages = build_stages(cfg, 2)
    x = _slide(64, 64)
    for stage in stages:
        assert stage.streaming.limit > 64 * 64
        x, metrics = stage.train_step(x, 1)
        assert metrics["streamed"] == 0.0
