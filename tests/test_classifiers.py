"""
Which classifier decides (predict.classifier): names and choices, early exit at A_i, the ensemble, and the
bootstrap intervals every classifier's test metrics carry.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from distlocal.classifiers import best_index, choose
from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.local import LocalExecutor
from distlocal.engine.metrics import classification_metrics, resampled_metrics
from distlocal.model import build_stages
from distlocal.predict import Predictor


def test_choices_resolve_to_classifiers_and_stage_depths():
    assert choose("A_2", 4) == choose("best", 4, recorded="A_2")
    assert (choose("A_2", 4).depth, choose("H", 4).depth, choose("ensemble", 4).depth) == (2, 4, 4)
    assert choose("ensemble", 4).members == (0, 1, 2, 3)
    assert choose("best", 4).name == "H"  # a checkpoint from before the choice was recorded
    assert choose("best", 2, recorded="A_3").name == "H"  # recorded by a run of another K: not a classifier here
    assert choose("ensemble", 1).name == "H"  # an end-to-end run has one classifier
    assert best_index([0.5, 0.9, 0.9, 0.8]) == 1  # a tie goes to the shallower, cheaper classifier
    assert best_index([math.nan, 0.1, math.nan]) == 1
    combined = choose("ensemble", 2).combine([torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])])
    torch.testing.assert_close(combined, torch.tensor([0.4, 0.6]))


@pytest.mark.parametrize(("overrides", "says"), [
    (["model.k=4", "predict.classifier=A_4"], r"predict\.classifier='A_4'.*K=4 has A_1 \.\. A_3 and H.*choose best"),
    (["model.mode=e2e", "predict.classifier=A_1"], r"an end-to-end run has one classifier, H.*, H, ensemble"),
    (["predict.classifier=last"], r"predict\.classifier='last' is not a classifier.*choose best"),
])
def test_a_classifier_the_run_lacks_is_refused_with_the_fix(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)
    assert load_config(None, ["model.k=8", "predict.classifier=A_7"]).predict.classifier == "A_7"


def _auroc_by_pairs(scores: np.ndarray, positive: np.ndarray) -> float:
    """Every positive-negative pair: 1 if the positive scores higher, 1/2 on a tie (the definition, slowly)."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


@pytest.mark.parametrize("classes", [2, 3])
def test_all_bootstrap_resamples_at_once_equal_each_resample_scored_alone(classes):
    """
    The vectorised resample metrics against the definitions in float64 (ties included): counts are exact integers
    in float64, so only the last division rounds. Against torchmetrics, which scores in fp32: within its rounding.
    """
    rng = np.random.default_rng(classes)
    n = 40
    probs = rng.dirichlet(np.ones(classes), n)
    probs[5] = probs[6]  # tied scores
    probs[7] = probs[8]
    labels = np.arange(n) % classes
    index = rng.integers(0, n, (200, n))
    index[0] = 0  # one class only: AUROC undefined
    got = resampled_metrics(probs, labels, classes, index)
    for b, rows in enumerate(index):
        p, y = probs[rows], labels[rows]
        correct = p.argmax(1) == y
        present = [c for c in range(classes) if (y == c).any()]
        assert got["acc"][b] == pytest.approx(correct.mean(), rel=1e-12)
        assert got["balanced_acc"][b] == pytest.approx(np.mean([correct[y == c].mean() for c in present]), rel=1e-12)
        assert got["loss"][b] == pytest.approx(-np.log(p[np.arange(n), y]).mean(), rel=1e-12)
        if len(present) < classes:
            assert math.isnan(got["auroc"][b])
            continue
        auroc = np.mean([_auroc_by_pairs(p[:, c], y == c) for c in range(classes)])
        assert got["auroc"][b] == pytest.approx(auroc, rel=1e-12)
        reference = classification_metrics(torch.from_numpy(p), torch.from_numpy(y), classes)
        for name, value in reference.items():  # fp32 sums of n terms below 1: a few n * 2**-24 at most
            assert got[name][b] == pytest.approx(value, abs=4 * n * 2**-24)


def _counting(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_early_exit_runs_stages_one_to_i_and_gives_that_classifiers_probabilities(make_cfg, manifest):
    """
    predict.classifier=A_2 of K=4: the probabilities of A_2 as a full forward computes them, and stages 3 and 4
    never run (predict and the local executor alike); the ensemble is the mean of all four classifiers.
    """
    cfg = make_cfg("model.backbone=resnet18", "model.split=balanced", "model.k=4")
    stages = build_stages(cfg, 2)
    record = read_manifest(manifest).split("valid")[0]
    loader = SlideLoader(cfg.data, train=False)
    x = loader.load(record)
    full = Predictor.from_stages(cfg, ["a", "b"], stages, torch.device("cpu"))
    assert full.choice.name == "H"  # best, with nothing recorded
    every = full(x, aux=True)["classifiers"]
    assert list(every) == ["A_1", "A_2", "A_3", "H"]
    late = [_counting(stage.modules["backbone"]) for stage in stages[2:]]
    early_cfg = copy.deepcopy(cfg)
    early_cfg.predict.classifier = "A_2"
    early = Predictor.from_stages(early_cfg, ["a", "b"], stages, torch.device("cpu"))
    result = early(x)
    assert torch.equal(result["probs"], every["A_2"])
    assert result["attention_of"] == "A_2"
    assert [c[0] for c in late] == [0, 0]
    ensemble = Predictor.from_stages(cfg, ["a", "b"], stages, torch.device("cpu"), best_classifier="A_1")
    assert ensemble.choice.name == "A_1"  # best: what the checkpoint recorded
    ensemble.choice = choose("ensemble", 4)
    torch.testing.assert_close(ensemble(x)["probs"], torch.stack(list(every.values())).mean(0), rtol=0, atol=1e-7)

    executor = LocalExecutor(stages)
    [(_, two)] = list(executor.evaluate([record], loader, depth=2))
    assert [c[0] for c in late] == [1, 1]  # only the ensemble's forward above ran them
    [(_, four)] = list(executor.evaluate([record], loader))
    assert len(two) == 2
    for ours, theirs in zip(two, four[:2], strict=False):
        assert torch.equal(ours, theirs)

