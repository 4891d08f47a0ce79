"""The best-checkpoint rule: the monitored metric, then the validation loss, then the later epoch."""

import math

from distlocal.engine.selection import Candidate, select


def test_first_epoch_is_kept_with_its_reason():
    """Nothing held yet: the first validated epoch is the best so far."""
    assert select("acc", Candidate(1, 0.5, 0.7), None).startswith("the first validated epoch")


def test_a_better_metric_wins_whatever_the_loss():
    """A higher accuracy replaces the held epoch even with a higher loss; a lower one never does."""
    assert select("acc", Candidate(2, 0.9, 0.9), Candidate(1, 0.8, 0.1)).startswith("higher acc")
    assert select("acc", Candidate(2, 0.7, 0.01), Candidate(1, 0.8, 0.9)) is None


def test_a_tie_goes_to_the_lower_validation_loss():
    """Equal accuracy: the lower loss wins, whichever epoch has it."""
    assert "lower validation loss" in select("acc", Candidate(5, 1.0, 0.08), Candidate(2, 1.0, 0.31))
    assert select("acc", Candidate(5, 1.0, 0.31), Candidate(2, 1.0, 0.08)) is None


def test_a_tie_in_both_goes_to_the_later_epoch():
    """Equal accuracy and loss: the later epoch, which trained longer."""
    assert select("auroc", Candidate(3, 1.0, 0.2), Candidate(1, 1.0, 0.2)).endswith("the later epoch")


def test_monitor_loss_is_lower_better():
    """train.monitor=loss: a lower loss is better, a higher one is not."""
    assert select("loss", Candidate(2, 0.1, 0.1), Candidate(1, 0.3, 0.3)).startswith("lower loss")
    assert select("loss", Candidate(2, 0.4, 0.4), Candidate(1, 0.3, 0.3)) is None


def test_nan_never_wins():
    """A NaN metric does not replace a number, and a number replaces a NaN."""
    assert select("auroc", Candidate(2, math.nan, 0.1), Candidate(1, 0.6, 0.5)) is None
    assert select("auroc", Candidate(2, 0.6, 0.5), Candidate(1, math.nan, 0.1)) is not None
