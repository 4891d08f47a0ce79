"""One key changed alone (model.k, model.mode) gives a whole config on every shipped config, and that config trains."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from distlocal.config_load import config_to_dict, load_config
from distlocal.engine.faults import ClusterError
from distlocal.engine.placement import stage_resources
from distlocal.model import build_stages

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
KS = (1, 2, 4, 8, 16)
# Where each of ResNet34's layers ends (blocks 0-2 are layer1, 3-6 layer2, 7-12 layer3, 13-15 layer4).
LAYER_ENDS = list(itertools.accumulate((3, 4, 6, 3)))


def _variants() -> list[list[str]]:
    """Each key alone, then the pairs a sweep's --grid model.mode=local,e2e --grid model.k=... makes."""
    return ([[f"model.k={k}"] for k in KS] + [["model.mode=e2e"]]
            + [["model.mode=e2e", f"model.k={k}"] for k in KS])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_one_key_resolves_on_every_shipped_config(path):
    """model.k in 1..16 or model.mode=e2e resolves: e2e is K = 1, the paper's split only at K = 4 / 8, cut recorded."""
    for overrides in _variants():
        m = load_config(path, overrides).model
        k = 1 if "model.mode=e2e" in overrides else int(overrides[0].split("=")[1])
        assert m.k == k, overrides
        assert m.split == ("reference" if k in (4, 8) else "balanced"), overrides
        assert len(m.blocks_per_stage) == k, overrides
        assert sum(m.blocks_per_stage) == 16, overrides


def _distinct_models() -> list[tuple[str, Path, list[str]]]:
    """The variants of every shipped config whose networks differ (the paper's configs share theirs)."""
    seen, cases = set(), []
    for path, overrides in itertools.product(CONFIGS, _variants()):
        cfg = load_config(path, overrides)
        key = json.dumps(config_to_dict(cfg)["model"] | {"pretrained": ""})
        if key not in seen:
            seen.add(key)
            cases.append((f"{path.stem}[{','.join(overrides)}]", path, overrides))
    return cases


@pytest.mark.parametrize(("path", "overrides"), [case[1:] for case in _distinct_models()],
                         ids=[case[0] for case in _distinct_models()])
def test_every_resolved_config_trains_one_step(path, overrides):
    """Each distinct network builds and trains one step on a tiny slide; every classifier has its layer's kernel."""
    # fp32: the paper's configs ask for bf16, which follows no K and is many times slower under CPU autocast.
    cfg = load_config(path, [*overrides, "train.device=cpu", "train.accumulate=1", "train.precision=fp32"])
    cfg.model.pretrained = "none"  # no download in tests; the weights do not change what is built
    stages = build_stages(cfg, num_classes=2)
    assert len(stages) == cfg.model.k
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for stage in stages:
        x, metrics = stage.train_step(x, 1)
        assert math.isfinite(metrics["loss"])
        layer = next(i for i, end in enumerate(LAYER_ENDS) if stage.spec.blocks[-1] < end)
        classifier = stage.net.head if cfg.model.mode == "e2e" else stage.modules["classifier"]
        assert classifier.kernel == cfg.model.classifier_kernels[layer]


def test_reference_split_falls_back_to_balanced_with_a_note(caplog):
    """K=2 on the paper's split trains the balanced one, says so, and records it."""
    caplog.set_level("INFO", logger="distlocal.config_load")
    m = load_config(CONFIGS[0], ["model.k=2"]).model
    assert (m.split, m.blocks_per_stage) == ("balanced", [8, 8])
    assert "uses model.split=balanced" in caplog.text


def test_cpus_per_stage_defaults_to_what_fits_the_cluster(local_ray):
    """By default K stages share a cluster with fewer CPUs than K; a value set by hand that does not fit still fails."""
    demo = load_config(CONFIGS[0].with_name("demo.yaml"), ["model.k=8"])
    assert demo.train.cpus_per_stage == 0
    assert stage_resources(demo.train, 8) == (6 / 8, 0.0)  # local_ray: 6 CPUs
    assert stage_resources(demo.train, 4) == (1.0, 0.0)
    demo.train.cpus_per_stage = 1.0
    with pytest.raises(ClusterError, match=r"8 stages x \(1 CPU, 0 GPU\) = 8 CPUs, but the cluster has 6"):
        stage_resources(demo.train, 8)
