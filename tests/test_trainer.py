"""The local trainer: checkpoints with their config, exact resume, evaluation, and bad slides."""

import csv
import json

import pytest
import torch

from distlocal.classifiers import best_index, classifier_name
from distlocal.cli import main
from distlocal.config_load import load_config, save_config
from distlocal.data import ManifestError
from distlocal.engine.checkpoint import CheckpointError, load_checkpoint
from distlocal.engine.evaluate import evaluate_checkpoint
from distlocal.engine.trainer import Trainer
from distlocal.slides import SlideError
from tests.tiny_run import tiny_run


def _cfg(manifest, tmp_path, *overrides):
    # No heatmaps: what these tests check is the trainer's bookkeeping. Windows of 2 slides: the pending gradients
    # and step counts below are counted in them.
    return tiny_run(manifest, tmp_path, "train.heatmaps=0", "model.k=2", "train.accumulate=2", *overrides)


def _params(trainer):
    return [s.state_dict()["modules"] for s in trainer.executor.stages]


def test_checkpoints_carry_the_resolved_config(manifest, tmp_path, caplog):
    """Every checkpoint folder holds the stages, the trainer position and the resolved config."""
    cfg = _cfg(manifest, tmp_path)
    with caplog.at_level("INFO", logger="distlocal.engine.trainer"):
        summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["completed"]
    # validation is one log line per epoch, H first
    [line] = [r.getMessage() for r in caplog.records if "validation:" in r.getMessage()]
    assert line.startswith("epoch 1 validation: H ")
    assert ", A_1 " in line
    assert summary["epochs"] == 1
    for name in ("last", "best"):
        folder = tmp_path / "run" / "checkpoints" / name
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "stage1.pt", "stage2.pt", "trainer.pt"]
        assert load_config(folder / "config.yaml") == cfg
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last").trainer["epoch"] == 1


def test_resume_equals_training_straight_through(manifest, tmp_path):
    """Stopping after 5 slides (mid-accumulation, mid-epoch) and resuming gives the same parameters."""
    straight = Trainer(_cfg(manifest, tmp_path, "train.epochs=2", "train.accumulate=3"), tmp_path / "a")
    straight.fit()
    stopped = Trainer(_cfg(manifest, tmp_path, "train.epochs=2", "train.accumulate=3", "train.max_slides=5"),
                      tmp_path / "b")
    assert not stopped.fit()["completed"]
    assert stopped.executor.stages[0].optim.accumulated == 2  # gradients were pending at the stop
    resumed = Trainer(_cfg(manifest, tmp_path, "train.epochs=2", "train.accumulate=3"), tmp_path / "b", resume=True)
    assert resumed.state.slides_seen == 5
    resumed.fit()
    assert resumed.state.slides_seen == straight.state.slides_seen
    # predict.classifier=best: the best checkpoint is the epoch whose best classifier validated best (ties: its
    # lower validation loss, then the later epoch; the shallower classifier), and it records that classifier.
    state = straight.state
    scores = [[m["auroc"] if m["auroc"] == m["auroc"] else m["acc"] for m in h["stages"]] for h in state.history]
    losses = [h["stages"][best_index(s)]["loss"] for h, s in zip(state.history, scores, strict=True)]
    assert state.best_epoch == 1 + max(range(2), key=lambda e: (max(scores[e]), -losses[e], e))
    assert state.best_classifier == classifier_name(best_index(scores[state.best_epoch - 1]), 2)
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "best").trainer["best_classifier"] == state.best_classifier
    for ours, theirs in zip(_params(resumed), _params(straight), strict=True):
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_train_and_eval_commands(manifest, tmp_path, capsys):
    """`distlocal train` then `distlocal eval` report H and every A_i on the test split."""
    config = tmp_path / "c.yaml"
    save_config(_cfg(manifest, tmp_path, "run.name=cli"), config)
    assert main(["train", str(config)]) == 0
    best = tmp_path / "cli" / "checkpoints" / "best"
    assert main(["eval", str(config), "--checkpoint", str(best), "--set", "predict.classifier=ensemble"]) == 0
    out = capsys.readouterr().out
    assert "\nA_1 " in out
    assert "\nensemble* " in out
    report = json.loads((best / "eval_test.json").read_text())
    assert len(report["stages"]) == 2
    assert list(report["classifiers"]) == ["A_1", "H", "ensemble"]
    assert report["best_classifier"] == load_checkpoint(best).trainer["best_classifier"]
    assert report["slides"] == sum(1 for r in csv.DictReader(manifest.open()) if r["split"] == "test")
    final = json.loads((tmp_path / "cli" / "test_metrics.json").read_text())
    assert list(final["classifiers"]) == list(report["classifiers"])
    for name, metrics in final["classifiers"].items():
        assert metrics == pytest.approx(report["classifiers"][name], abs=1e-6, nan_ok=True)  # the same checkpoint
        low, high = final["ci95"][name]["acc"]
        assert low <= metrics["acc"] <= high, name
    # By default the recorded best decides; A_1 exits after stage 1, so stage 2 never runs
    assert main(["eval", str(config), "--checkpoint", str(best)]) == 0
    default = json.loads((best / "eval_test.json").read_text())
    assert default["classifier"] == report["best_classifier"]
    assert f"* decides (predict.classifier): {default['classifier']}" in capsys.readouterr().out
    assert main(["eval", str(config), "--checkpoint", str(best), "--set", "predict.classifier=A_1"]) == 0
    early = json.loads((best / "eval_test.json").read_text())
    assert (early["classifier"], list(early["classifiers"])) == ("A_1", ["A_1"])
    assert early["decided"] == pytest.approx(report["classifiers"]["A_1"], abs=1e-6, nan_ok=True)
    assert main(["eval", str(config), "--checkpoint", str(best), "--set", "predict.classifier=A_2"]) == 2
    said = capsys.readouterr()
    assert "predict.classifier='A_2' is not a classifier of this run (K=2 has A_1 and H)" in said.out + said.err
    assert main(["train", str(config)]) == 2  # the run folder exists: told to --resume instead


def test_cli_resume_finishes_a_stopped_run(manifest, tmp_path, capsys):
    """`distlocal train --resume RUN_DIR` continues a run stopped mid-epoch and completes it."""
    config = tmp_path / "c.yaml"
    save_config(_cfg(manifest, tmp_path, "run.name=r", "train.max_slides=3"), config)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "r"), "--set", "train.max_slides=0"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nrun folder:")[0])
    assert summary["completed"]
    assert summary["slides_seen"] == sum(1 for r in csv.DictReader(manifest.open()) if r["split"] == "train")
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2  # no run there: a one-line error


def test_end_to_end_mode_trains(manifest, tmp_path):
    """model.mode=e2e trains the baseline through the same loop."""
    summary = Trainer(_cfg(manifest, tmp_path, "model.mode=e2e", "model.k=1"), tmp_path / "e2e").fit()
    assert summary["completed"]
    assert len(summary["last_val"]) == 1


def _with_bad_slide(manifest, tmp_path, path_text, writer=None):
    rows = list(csv.DictReader(manifest.open()))
    bad = tmp_path / path_text
    if writer:
        writer(bad)
    rows.append({"slide_id": "broken", "path": str(bad), "label": "class1", "split": "train", "patient_id": "p"})
    out = tmp_path / "manifest.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: (str(manifest.parent / v) if k == "path" and not v.startswith("/") else v)
                        for k, v in row.items()})
    return out


def test_corrupt_slide_fails_naming_it(manifest, tmp_path):
    """With data.on_error=fail a corrupt slide stops training with its name."""
    bad = _with_bad_slide(manifest, tmp_path, "broken.tiff", lambda p: p.write_bytes(b"II*\x00garbage"))
    with pytest.raises(SlideError, match="broken"):
        Trainer(_cfg(bad, tmp_path), tmp_path / "fail").fit()


def test_corrupt_slide_is_skipped_and_reported(manifest, tmp_path):
    """With data.on_error=skip the run finishes and lists the skipped slide once."""
    bad = _with_bad_slide(manifest, tmp_path, "broken.tiff", lambda p: p.write_bytes(b"II*\x00garbage"))
    summary = Trainer(_cfg(bad, tmp_path, "data.on_error=skip", "train.epochs=2"), tmp_path / "skip").fit()
    assert summary["completed"]
    assert [s["slide_id"] for s in summary["skipped"]] == ["broken"]


def test_missing_slide_files_are_listed_up_front(manifest, tmp_path):
    """Missing files fail before training, naming the slide and the way out."""
    bad = _with_bad_slide(manifest, tmp_path, "nowhere.tiff")
    with pytest.raises(ManifestError, match=r"broken.*data\.on_error=skip"):
        Trainer(_cfg(bad, tmp_path), tmp_path / "missing")


def test_missing_checkpoint_names_the_fix(tmp_path):
    """Evaluating a folder without a checkpoint says what to pass."""
    with pytest.raises(CheckpointError, match="checkpoints/best"):
        evaluate_checkpoint(tmp_path / "nothing")



def test_a_stage_failing_while_the_epoch_checkpoint_is_saved_is_recovered(manifest, tmp_path):
    """
    A stage that dies while the end-of-epoch checkpoint is written (a Ray actor lost mid-save) sends the run back
    to the previous checkpoint and the epoch is replayed, as a failure while training is: the run still finishes.
    """
    from distlocal.engine.faults import StageFailure
    from distlocal.engine.local import LocalExecutor

    class DiesWhileSaving(LocalExecutor):
        lasts = 0

        def save_stages(self, directory):
            DiesWhileSaving.lasts += directory.name.startswith("last")
            if DiesWhileSaving.lasts == 2 and directory.name.startswith("last"):  # epoch 2's "last", once
                DiesWhileSaving.lasts += 1
                raise StageFailure("stage 2: RayActorError: the actor died unexpectedly")
            super().save_stages(directory)

        def recover(self, directory):
            self.load_stages(directory)

    trainer = Trainer(_cfg(manifest, tmp_path, "train.epochs=2"), tmp_path / "run")
    trainer.executor = DiesWhileSaving(trainer.executor.stages)
    summary = trainer.fit()
    assert summary["completed"]
    assert [f["epoch"] for f in summary["failures"]] == [3]  # after epoch 2: epoch 2 is replayed from epoch 1's
    assert summary["epochs"] == 2
    assert DiesWhileSaving.lasts == 4
    assert "the actor died" in summary["failures"][0]["error"]


def test_tied_validation_keeps_the_epoch_the_rule_picks(manifest, tmp_path):
    """
    Validation that ties in every epoch (a learning rate too small to change an fp32 weight) keeps the last epoch,
    as the tie-break says (same accuracy, same loss: the later epoch), and the best checkpoint records why.
    """
    cfg = _cfg(manifest, tmp_path, "train.epochs=2", "train.lr_backbone=1e-12", "train.lr_aux=1e-12",
               "train.monitor=acc")
    trainer = Trainer(cfg, tmp_path / "tied")
    summary = trainer.fit()
    first, second = (h["stages"] for h in trainer.state.history)
    assert first == second  # the premise: nothing changed, so every metric ties
    assert summary["best_epoch"] == 2
    saved = load_checkpoint(tmp_path / "tied" / "checkpoints" / "best", stages=False).trainer
    assert saved["best_epoch"] == 2
    assert saved["best_reason"].endswith("the later epoch")
