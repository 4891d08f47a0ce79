"""The method learns: K = 4 local training on the demo's task beats chance clearly; the demo's pieces."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from distlocal.commands.demo import CONFIG, DATASET, ensure_slides, report
from distlocal.config_load import load_config
from distlocal.engine.trainer import Trainer
from distlocal.slides import write_synthetic_dataset


@pytest.fixture(scope="module")
def detect_slides(tmp_path_factory):
    """A smaller copy of the demo's task: 30 slides (18 train, 6 valid, 6 test), tumour-like structures or none."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("detect"), slides=30, classes=2, size=(256, 256), seed=1,
                                   task="detect")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`distlocal demo` as a newcomer runs it (one epoch here), once for the tests that read what it did."""
    import ray

    from distlocal.cli import main

    root = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["demo", "--set", f"data.manifest={root / 'demo' / 'manifest.csv'}", "--set",
                         "train.epochs=1", "--set", f"run.dir={root / 'runs'}", "--set", "train.heatmaps=1"])
    finally:
        ray.shutdown()  # the command leaves its local Ray to the process's exit; later test modules start their own
    assert code == 0
    return {"dir": root, "out": out.getvalue()}


def test_local_training_k4_learns_the_synthetic_task(detect_slides, tmp_path):
    """K = 4 from random init, the demo's settings, local executor: held-out slides well above chance."""
    cfg = load_config(CONFIG, [f"data.manifest={detect_slides}", "train.executor=local", "train.device=cpu",
                               "tracking.enabled=false", "train.heatmaps=0", "train.epochs=4"])
    summary = Trainer(cfg, tmp_path / "run").fit()
    test = summary["test"]
    # 6 test slides, 3 per class: chance is AUROC 0.5; the early stages find the structures first.
    assert test["test/stage1/auroc"] >= 0.9
    assert test["test/auroc"] >= 0.85, test
    assert max(test["test/acc"], test["test/stage1/acc"]) >= 5 / 6, test


def test_demo_slides_are_written_once(demo_run):
    """The demo wrote its slide set and marked it; a second call finds the set and leaves every file as it is."""
    manifest = demo_run["dir"] / "demo" / "manifest.csv"
    assert "wrote 40 synthetic slides" in demo_run["out"]
    assert json.loads((manifest.parent / "demo.json").read_text()) == DATASET
    stamps = {p: p.stat().st_mtime_ns for p in manifest.parent.rglob("*")}
    again, written = ensure_slides(manifest)
    assert (again, written) == (manifest, False)
    assert {p: p.stat().st_mtime_ns for p in manifest.parent.rglob("*")} == stamps


def test_demo_config_is_valid_and_k4_on_ray():
    cfg = load_config(CONFIG, [])
    assert (cfg.model.k, cfg.train.executor, cfg.model.rfr.enabled) == (4, "ray", True)


def test_paper_configs_load_with_the_papers_settings():
    """NSCLC / RCC / LKS at K = 4 and 8: classes, reference split, RFR, learning rates (doubled for LKS)."""
    expected = {"tcga_nsclc": (["LUAD", "LUSC"], 1e-5, 2e-5), "tcga_rcc": (["KICH", "KIRC", "KIRP"], 1e-5, 2e-5),
                "lks": (["Negative", "AMA", "SMA-V", "SMA-T"], 2e-5, 4e-5)}
    for name, (classes, lr_backbone, lr_aux) in expected.items():
        for k in (4, 8):
            cfg = load_config(Path(CONFIG).parent / f"{name}_k{k}.yaml", [])
            assert (cfg.model.k, cfg.model.split, cfg.model.pretrained) == (k, "reference", "imagenet")
            assert cfg.model.rfr.enabled
            assert cfg.predict.classifier == "H"  # the paper's classifier decides and picks the checkpoint
            assert cfg.data.classes == classes
            assert (cfg.train.lr_backbone, cfg.train.lr_aux, cfg.train.accumulate) == (lr_backbone, lr_aux, 8)
            no_rfr = load_config(Path(CONFIG).parent / f"{name}_k{k}.yaml", ["model.rfr.enabled=false"])
            assert not no_rfr.model.rfr.enabled


def test_demo_report_names_every_classifier_and_the_mlflow_command(tmp_path):
    cfg = load_config(CONFIG, [])
    test = {"test/acc": 0.875, "test/auroc": 1.0, **{f"test/stage{i}/acc": 0.75 for i in (1, 2, 3)},
            **{f"test/stage{i}/auroc": 0.9 for i in (1, 2, 3)}, "test/ensemble/acc": 0.8,
            "test/ensemble/auroc": 0.95, "test/stage2/auroc_ci_low": 0.8, "test/stage2/auroc_ci_high": 0.97}
    reason = "A_2: acc tied at 1.0000 with epoch 2; lower validation loss (0.0800 < 0.3100)"
    text = report({"test": test, "epochs": 5, "slides_seen": 120, "best_epoch": 4, "classifier": "A_2",
                   "best_reason": reason}, cfg, tmp_path / "demo-x", 150.0, "sqlite:////abs/runs/mlflow.db")
    assert "best checkpoint (epoch 4 of 5)" in text
    assert f"\n  chosen because {reason}\n" in text
    assert "  H              0.875  1.000\n" in text
    assert "  A_3            0.750  0.900\n" in text
    assert "  A_2            0.750  0.900  (0.80-0.97)  <- decides (predict.classifier)\n" in text
    assert "  ensemble       0.800  0.950\n" in text
    assert "uv run mlflow ui --backend-store-uri sqlite:////abs/runs/mlflow.db" in text
    assert "in 2.5 min" in text


def test_demo_command_end_to_end(demo_run):
    """`distlocal demo` end to end: slides, Ray K = 4, MLflow, the summary."""
    out, root = demo_run["out"], demo_run["dir"]
    assert "wrote 40 synthetic slides" in out
    assert "K=4 stages (ray executor), 1 epochs, 24 training slides seen" in out
    for name in ("A_1", "A_2", "A_3", "H"):
        assert f"  {name} " in out
    assert f"--backend-store-uri sqlite:///{root / 'runs' / 'mlflow.db'}" in out
    (run_dir,) = (root / "runs").glob("demo-*")
    assert (run_dir / "checkpoints" / "best" / "stage4.pt").is_file()
    assert (run_dir / "plots" / "roc_test.png").is_file()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("distlocal").experiment_id])
    assert runs[0].data.tags["executor"] == "ray"
    assert "test/auroc" in runs[0].data.metrics
