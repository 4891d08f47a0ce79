"""Sweeps: a 2 x 2 grid as nested MLflow runs, the ablation table, `compare`, resume, and grid parsing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distlocal.cli import main
from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.slides import write_synthetic_dataset
from distlocal.sweep import auto_parallel, child_configs, parse_grid, plan_children
from tests.tiny_run import tiny_run

GRID = ["--grid", "model.k=2,3", "--grid", "model.rfr.enabled=true,false"]
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished 2 x 2 sweep (K x RFR) on tiny synthetic slides, with its command line."""
    root = tmp_path_factory.mktemp("sweep")
    manifest = write_synthetic_dataset(root / "slides", slides=12, classes=2, size=(96, 96), seed=0)
    argv = ["sweep", "--name", "abl", *GRID, "--set", f"data.manifest={manifest}", "--set", f"run.dir={root / 'runs'}",
            "--set", "train.device=cpu", "--set", "model.backbone=resnet18", "--set", "model.split=balanced",
            "--set", "model.aux_kernels=[]", "--set", "train.epochs=1", "--set", "train.accumulate=2",
            "--set", "model.rfr.patch_size=16", "--set", "data.augment=false"]
    assert main(argv) == 0
    return root / "runs", argv


def _client(runs):
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    return client, client.get_experiment_by_name("distlocal").experiment_id


def test_one_parent_and_four_nested_children(sweep):
    """The parent run holds the table; each child is nested under it with its own K and RFR."""
    runs, _ = sweep
    client, experiment = _client(runs)
    all_runs = client.search_runs([experiment])
    parents = [r for r in all_runs if r.data.tags.get("distlocal.sweep") == "parent"]
    assert len(parents) == 1
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4
    assert {(r.data.params["model.k"], r.data.params["model.rfr.enabled"]) for r in children} == \
        {("2", "True"), ("2", "False"), ("3", "True"), ("3", "False")}
    assert all(r.info.status == "FINISHED" for r in all_runs)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"ablation.md", "ablation.csv", "sweep.json"} <= artifacts


def test_table_has_each_childs_numbers(sweep):
    """Each row of ablation.csv is its child's test accuracy and AUROC (one seed: mean = the value, std 0)."""
    runs, _ = sweep
    with (runs / "abl" / "ablation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        child = runs / "abl" / f"k-{row['model.k']}__rfr_enabled-{row['model.rfr.enabled'].lower()}__seed0"
        test = json.loads((child / "summary.json").read_text())["test"]
        assert float(row["acc_mean"]) == pytest.approx(test["test/acc"])
        assert float(row["auroc_mean"]) == pytest.approx(test["test/auroc"])
        assert float(row["acc_std"]) == 0.0
        # beside H: the classifier that decided (predict.classifier=best), its metrics and the ensemble's
        summary = json.loads((child / "summary.json").read_text())
        assert row["decides"] == summary["classifier"] == summary["best_classifier"]
        assert float(row["chosen_auroc_mean"]) == pytest.approx(test["test/chosen/auroc"])
        assert float(row["ensemble_acc_mean"]) == pytest.approx(test["test/ensemble/acc"])


def test_compare_prints_the_same_table(sweep, capsys):
    """`distlocal compare` rebuilds the sweep's table from MLflow alone."""
    runs, _ = sweep
    capsys.readouterr()
    assert main(["compare", "distlocal", "--run-dir", str(runs), "--by", "model.k,model.rfr.enabled"]) == 0
    table = capsys.readouterr().out.strip()
    assert table == (runs / "abl" / "ablation.md").read_text().strip()
    assert "| decides | decided acc | decided auroc | ensemble acc | ensemble auroc |" in table.splitlines()[0]
    # and every classifier's test AUROC: K=2 has A_1 only, so its A_2 is n/a
    lines = table.splitlines()
    assert "| model.k | model.rfr.enabled | A_1 auroc | A_2 auroc | H auroc | ensemble auroc |" in lines
    k2 = next(line for line in lines[lines.index("Test AUROC of every classifier:"):] if line.startswith("| 2 |"))
    assert k2.split(" | ")[3] == "n/a"


def test_rerun_redoes_nothing_and_finishes_an_interrupted_child(sweep):
    """The same command again trains no finished child and completes one whose summary is missing."""
    runs, argv = sweep
    client, experiment = _client(runs)
    before = len(client.search_runs([experiment]))
    interrupted = runs / "abl" / "k-2__rfr_enabled-false__seed0" / "summary.json"
    interrupted.unlink()
    others = {p: p.stat().st_mtime_ns for p in (runs / "abl").glob("*/summary.json")}
    assert main(argv) == 0
    assert json.loads(interrupted.read_text())["completed"]
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert len(client.search_runs([experiment])) == before  # the child continued its own MLflow run


def test_another_grid_under_the_same_name_is_refused(sweep, capsys):
    """A different sweep cannot overwrite the folder of an earlier one."""
    _, argv = sweep
    changed = [a if a != "model.k=2,3" else "model.k=2,4" for a in argv]
    assert main(changed) == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_children_side_by_side(tmp_path):
    """--parallel 2 trains two children at once in one driver; both complete."""
    manifest = write_synthetic_dataset(tmp_path / "slides", slides=8, classes=2, size=(96, 96), seed=1)
    argv = ["sweep", "--name", "par", "--grid", "model.rfr.enabled=true,false", "--parallel", "2",
            "--set", f"data.manifest={manifest}", "--set", f"run.dir={tmp_path / 'runs'}", "--set", "train.device=cpu",
            "--set", "model.backbone=resnet18", "--set", "model.k=2", "--set", "model.split=balanced",
            "--set", "model.aux_kernels=[3,1]",
            "--set", "train.epochs=1", "--set", "model.rfr.patch_size=16", "--set", "tracking.enabled=false"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "runs" / "par" / "sweep_result.json").read_text())
    assert (result["children"], result["completed"], result["failed"]) == (2, 2, {})


def test_grid_parsing():
    """Values split on commas outside brackets; malformed grids name the fix."""
    assert parse_grid(["model.k=4,8", "model.aux_kernels=[3,1],[5,3]"]) == {
        "model.k": ["4", "8"], "model.aux_kernels": ["[3,1]", "[5,3]"]}
    children = plan_children({"model.k": ["4", "8"]}, seeds=2, base_seed=5)
    assert [c.name for c in children] == ["k-4__seed5", "k-4__seed6", "k-8__seed5", "k-8__seed6"]
    assert children[1].overrides == ["model.k=4", "train.seed=6"]
    for bad in (["model.k"], ["model.k=4,,8"], ["model.k=4", "model.k=8"], []):
        with pytest.raises(ConfigError, match=r"--grid|a sweep needs"):
            parse_grid(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_mode_and_k_grids_resolve_from_every_shipped_config(path, tmp_path):
    """--grid model.mode=local,e2e --grid model.k=1,2,4,8,16 gives every child a whole config: e2e ones take K=1."""
    children = plan_children(parse_grid(["model.mode=local,e2e", "model.k=1,2,4,8,16"]), seeds=1, base_seed=0)
    configs = child_configs(str(path), [], children, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    for child in children:
        m = configs[child.name].model
        k = 1 if child.settings["model.mode"] == "e2e" else int(child.settings["model.k"])
        assert (m.mode, m.k, len(m.blocks_per_stage)) == (child.settings["model.mode"], k, k), child.name


def test_e2e_beside_local_in_a_sweep(tmp_path):
    """A shipped K=4 config swept over model.mode=local,e2e trains both children, the e2e one as a single stage."""
    manifest = write_synthetic_dataset(tmp_path / "slides", slides=8, classes=2, size=(96, 96), seed=2)
    argv = ["sweep", str(CONFIGS[0].with_name("synthetic.yaml")), "--name", "modes",
            "--grid", "model.mode=local,e2e", "--set", "model.backbone=resnet18", "--set", f"data.manifest={manifest}",
            "--set", f"run.dir={tmp_path / 'runs'}", "--set", "train.device=cpu", "--set", "train.epochs=1",
            "--set", "tracking.enabled=false", "--set", "data.augment=false", "--set", "train.heatmaps=0"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "runs" / "modes" / "sweep_result.json").read_text())
    assert (result["children"], result["completed"], result["failed"]) == (2, 2, {})
    e2e = load_config(tmp_path / "runs" / "modes" / "mode-e2e__seed0" / "config.yaml").model
    assert (e2e.mode, e2e.k, e2e.blocks_per_stage) == ("e2e", 1, [8])


def test_sweep_fits_as_many_children_as_the_cluster_has_room_for(local_ray, manifest, tmp_path):
    """Side by side: 6 CPUs hold three K=2 children at one CPU per stage, one K=3 child at two CPUs per stage."""
    ray_run = ("train.executor=ray", "model.k=2")
    assert auto_parallel([tiny_run(manifest, tmp_path, *ray_run)] * 4) == 3
    assert auto_parallel([tiny_run(manifest, tmp_path, *ray_run, "model.k=3", "train.cpus_per_stage=2")]) == 1
    assert auto_parallel([tiny_run(manifest, tmp_path, "train.executor=local")]) == 1
