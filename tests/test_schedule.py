"""train.schedule: the lr drops on a plateau of a named validation metric, or after given epochs."""

import pytest
import torch

from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.model.optim import LocalOptimizer


def _lrs(overrides: list[str], metrics: list[float]) -> list[float]:
    """The backbone lr after each epoch's end, fed `metrics` in turn."""
    cfg = load_config(None, ["train.lr_backbone=1.0", "train.lr_aux=1.0", *overrides]).train
    optim = LocalOptimizer(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), cfg)
    optim.optimizer.step()  # (no gradients: no change) as training steps before an epoch ends
    out = []
    for metric in metrics:
        optim.end_epoch(metric)
        out.append(optim.lrs["backbone"])
    return out


def test_step_schedule_drops_after_the_given_epochs():
    """train.schedule=step: x factor after epochs 2 and 3, whatever validation says."""
    lrs = _lrs(["train.schedule=step", "train.lr_steps=[2,3]"], [0.1, 0.9, 0.2, 0.3])
    assert lrs == pytest.approx([1.0, 0.1, 0.01, 0.01])


def test_plateau_on_loss_treats_a_falling_loss_as_improving():
    """plateau_metric=loss: a falling validation loss keeps the lr; one that stops falling drops it."""
    falling = _lrs(["train.plateau_metric=loss", "train.plateau_patience=1"], [1.0, 0.9, 0.8, 0.7])
    assert falling == [1.0] * 4
    flat = _lrs(["train.plateau_metric=loss", "train.plateau_patience=1"], [1.0, 1.0, 1.0])
    assert flat == pytest.approx([1.0, 1.0, 0.1])


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["train.schedule=step"], r"train\.schedule=step needs train\.lr_steps"),
    (["train.schedule=step", "train.lr_steps=[3,2]"], r"increasing"),
    (["train.lr_steps=[3]"], r"train\.lr_steps=\[3\] applies to train\.schedule=step"),
    (["train.plateau_metric=f1"], r"train\.plateau_metric.*choose one of"),
])
def test_bad_schedule_names_the_fix(overrides, pattern):
    """A step schedule without steps, steps without it, or an unknown metric: an error naming the key."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)
