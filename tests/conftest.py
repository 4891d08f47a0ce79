"""Shared fixtures: tiny configs and inputs so the method's tests run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

import distlocal.engine  # noqa: F401  (sets Ray's environment before any test module imports ray)
from distlocal.config import load_config
from distlocal.slides import write_synthetic_dataset


@pytest.fixture
def make_cfg():
    """A validated Config with `--set`-style overrides on top of small-test defaults."""

    def make(*overrides: str):
        base = ["train.device=cpu", "train.accumulate=1", "model.rfr.patch_size=24", "train.lr_backbone=1e-3",
                "train.lr_aux=1e-3"]
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture
def slide():
    """A small normalised 'slide' tensor (1 x 3 x H x W)."""
    return torch.randn(1, 3, 160, 136, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Twelve small two-class synthetic slides (pyramidal TIFFs) with train/valid/test splits, once per module."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("slides"), slides=12, classes=2, size=(96, 96), seed=0)
