"""MLflow tracking with a real store: what a training logs, resume into the same run, and a server that is down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from distlocal.cli import main
from distlocal.config_load import load_config
from distlocal.data import read_manifest
from distlocal.engine.trainer import Trainer
from distlocal.slides import SlideError
from distlocal.tracking.sender import MlflowTracker
from tests.harness import end_process_group
from tests.tiny_run import tiny_run


def _cfg(manifest, run_dir, *overrides):
    # Tracking on (the subject here), two epochs (a history to read back), the default learning rates.
    return tiny_run(manifest, run_dir, "tracking.enabled=true", "model.aux_kernels=[3,1]", "train.epochs=2",
                    "train.accumulate=2", "data.augment=false", "train.lr_backbone=1e-5", "train.lr_aux=2e-5",
                    *overrides)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_training_logs_params_metrics_tags_and_artifacts(manifest, tmp_path):
    """With nothing configured a run lands in RUN.DIR/mlflow.db: everything issue-listed reads back."""
    cfg = _cfg(manifest, tmp_path, "run.name=first", "train.max_slides=6")
    Trainer(cfg, tmp_path / "first").fit()  # stops mid-run (max_slides): the resume continues the same MLflow run
    summary = Trainer(load_config(tmp_path / "first" / "config.yaml", ["train.max_slides=0"]), tmp_path / "first",
                      resume=True).fit()
    assert summary["completed"]
    run_id = json.loads((tmp_path / "first" / "mlflow_run.json").read_text())["run_id"]
    assert summary["tracking"]["run_id"] == run_id
    assert sum(summary["tracking"]["unsent"].values()) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("distlocal").experiment_id])) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.k"] == "2"
    assert run.data.params["model.rfr.enabled"] == "True"
    assert run.data.params["data.manifest"] == str(manifest)
    tags = run.data.tags
    assert (tags["executor"], tags["k"], tags["rfr"], tags["split"]) == ("local", "2", "on", "balanced")
    assert json.loads(tags["devices_per_stage"]) == ["cpu", "cpu"]
    assert tags["git_commit"]
    expected = {f"stage{i}/{name}" for i in (1, 2) for name in
                ("loss_cls", "loss_rec", "acc", "lr", "step_s", "peak_mem_mb")}
    expected |= {"val/acc", "val/balanced_acc", "val/auroc", "val/stage1/acc", "test/acc", "test/auroc",
                 "test/acc_ci_low", "test/acc_ci_high", "test/auroc_ci_low", "test/stage1/acc", "val/ensemble/auroc",
                 "val/best_stage", "test/stage1/auroc_ci_high", "test/ensemble/acc", "test/ensemble/auroc_ci_low",
                 "test/chosen/acc", "test/chosen/acc_ci_low"}
    assert expected <= set(run.data.metrics)
    metrics = run.data.metrics
    for prefix in ("test/", "test/stage1/", "test/ensemble/", "test/chosen/"):
        assert metrics[f"{prefix}acc_ci_low"] <= metrics[f"{prefix}acc"] <= metrics[f"{prefix}acc_ci_high"], prefix
    # the deciding classifier (predict.classifier=best: the one the best epoch validated best) is named in a tag
    assert tags["classifier"] == tags["best_classifier"] == summary["best_classifier"] in ("A_1", "H")
    decided = "test/" if tags["classifier"] == "H" else "test/stage1/"
    assert metrics["test/chosen/auroc"] == metrics[f"{decided}auroc"]
    val_history = client.get_metric_history(run_id, "val/acc")
    assert len(val_history) == 2  # one per epoch, across the resume
    local = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in sorted(val_history, key=lambda m: m.step)] == [r["val/acc"] for r in local
                                                                           if "val/acc" in r]
    artifacts = _artifacts(client, run_id)
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "plots/roc_test.png", "plots/confusion_test.png",
                 "plots/accuracy_by_depth.png", "plots/classifiers_by_epoch.png", "checkpoint_best/config.yaml",
                 "checkpoint_best/trainer.pt"):
        assert name in artifacts, f"{name} not among {sorted(artifacts)}"
    heatmaps = {name for name in artifacts if name.startswith("plots/attention/")}
    assert len(heatmaps) == min(3, len(read_manifest(manifest).split("valid")))  # train.heatmaps slides
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the store, not in ./mlruns of the cwd


def test_tracking_disabled_writes_no_store(manifest, tmp_path):
    """tracking.enabled=false: no MLflow run, no store, and training is otherwise the same."""
    summary = Trainer(_cfg(manifest, tmp_path, "tracking.enabled=false", "train.epochs=1"), tmp_path / "off").fit()
    assert summary["completed"]
    assert summary["tracking"] == {}
    assert not (tmp_path / "mlflow.db").exists()


def test_server_down_training_finishes_and_says_what_was_lost(manifest, tmp_path, caplog):
    """Nothing listens at tracking.uri: training completes and the unsent data is counted and kept in a file."""
    uri = f"http://127.0.0.1:{_free_port()}"
    cfg = _cfg(manifest, tmp_path, f"tracking.uri={uri}", "tracking.flush_timeout_s=1", "train.epochs=1")
    summary = Trainer(cfg, tmp_path / "down").fit()
    assert summary["completed"]
    report = summary["tracking"]
    assert report["run_id"] is None
    assert report["unsent"]["metrics"] > 0
    assert report["unsent"]["params"] > 0
    assert report["unsent"]["artifacts"] > 0
    spilled = (tmp_path / "down" / "tracking_unsent.jsonl").read_text().splitlines()
    assert sum(len(json.loads(line)[1]) for line in spilled if json.loads(line)[0] == "metrics") == \
        report["unsent"]["metrics"]
    assert "lost data" in caplog.text
    assert uri in caplog.text
    assert f"distlocal sync {tmp_path / 'down'}" in caplog.text

    # The server is still down: sync keeps every record and says so.
    assert main(["sync", str(tmp_path / "down")]) == 1
    assert (tmp_path / "down" / "tracking_unsent.jsonl").read_text().splitlines() == spilled
    assert not (tmp_path / "down" / "tracking_unsent.replaying.jsonl").exists()
    # A store that takes them: every metric, param and artifact arrives, once, in one finished run.
    store = f"sqlite:///{tmp_path / 'late.db'}"
    assert main(["sync", str(tmp_path / "down"), "--uri", store]) == 0
    assert not (tmp_path / "down" / "tracking_unsent.jsonl").exists()
    client = MlflowClient(store)
    run_id = json.loads((tmp_path / "down" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.k"] == "2"
    rows = sum(len(client.get_metric_history(run_id, key)) for key in run.data.metrics)
    assert rows == report["unsent"]["metrics"]
    assert len(_artifacts(client, run_id)) >= report["unsent"]["artifacts"]
    assert main(["sync", str(tmp_path / "down"), "--uri", store]) == 0  # nothing left: nothing sent twice
    assert sum(len(client.get_metric_history(run_id, key)) for key in run.data.metrics) == rows
    # Records spilled later go to the run's own store; another --uri is refused while the run exists.
    spill = tmp_path / "down" / "tracking_unsent.jsonl"
    spill.write_text(json.dumps(["metrics", [["late/metric", 1.5, 0, 7]]]) + "\n")
    assert main(["sync", str(tmp_path / "down"), "--uri", f"sqlite:///{tmp_path / 'other.db'}"]) != 0
    assert spill.exists()
    assert main(["sync", str(tmp_path / "down")]) == 0
    assert [m.value for m in client.get_metric_history(run_id, "late/metric")] == [1.5]
    assert client.get_run(run_id).info.status == "FINISHED"


def _wait_for_server(port: int, server: subprocess.Popen, timeout_s: float = 600) -> None:
    """Until the MLflow server answers /health: the sender's flush timeout is for sending, not for its start."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"mlflow server did not answer within {timeout_s:g} s"
        time.sleep(0.5)


def test_sender_buffers_until_a_late_server_comes_up(tmp_path):
    """A real `mlflow server` that starts after logging began still receives every metric, in order."""
    port = _free_port()
    tracker = MlflowTracker(f"http://127.0.0.1:{port}", "late", "late-run", flush_timeout_s=90, max_backoff_s=1)
    for step in range(50):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.log_params({"model.k": 4})
    time.sleep(1.5)
    assert tracker.run_id is None  # nothing listens yet: all of it is queued
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"]
    server = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # its own process group: end_process_group ends all of it
    try:
        _wait_for_server(port, server)  # its start takes 10-20 s on 2 idle cores, minutes on a busy machine
        report = tracker.finish()
        assert report["sent"]["metrics"] == 50
        assert sum(report["unsent"].values()) == 0
        client = MlflowClient(f"http://127.0.0.1:{port}")
        history = client.get_metric_history(report["run_id"], "loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(50))
        assert client.get_run(report["run_id"]).data.params["model.k"] == "4"
        assert client.get_run(report["run_id"]).info.status == "FINISHED"
    finally:
        end_process_group(server)  # terminate() alone would orphan the server's job consumers


def test_slides_replayed_after_a_crash_are_logged_once(manifest, tmp_path):
    """
    A run that dies mid-epoch and is resumed trains the slides since its checkpoint again; MLflow and
    metrics.jsonl still hold each metric once per step.
    """
    import shutil

    from distlocal.engine.trainer import epoch_order

    data = tmp_path / "data"
    shutil.copytree(manifest.parent, data)  # this test corrupts a slide: keep the module's dataset intact
    copy = data / manifest.name
    run_dir = tmp_path / "run"
    cfg = _cfg(copy, tmp_path, "train.epochs=1")
    trainer = Trainer(cfg, run_dir)
    trainer.fit()  # epoch 1 completes; its checkpoint is the one the crash goes back to
    victim = trainer.train_set[epoch_order(len(trainer.train_set), cfg.train.seed, 1)[4]]  # 5th slide of epoch 2
    good = victim.path.read_bytes()
    victim.path.write_bytes(b"II*\x00garbage")
    again = load_config(run_dir / "config.yaml", ["train.epochs=2"])
    with pytest.raises(SlideError, match=victim.slide_id):
        Trainer(again, run_dir, resume=True).fit()  # logs steps +2 and +4 of epoch 2, then dies
    victim.path.write_bytes(good)
    summary = Trainer(again, run_dir, resume=True).fit()  # replays epoch 2 from its first slide
    assert summary["completed"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pairs = [(k, r["step"]) for r in records for k in r if k not in ("step", "epoch")]
    assert len(pairs) == len(set(pairs))
    steps = sorted({r["step"] for r in records if "stage1/loss_cls" in r})
    assert steps == list(range(2, 2 * len(trainer.train_set) + 1, 2))  # every step of both epochs, once
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(summary["tracking"]["run_id"], "stage1/loss_cls")
    assert sorted(m.step for m in history) == steps
