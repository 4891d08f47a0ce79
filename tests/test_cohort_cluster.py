"""
A cohort on a simulated multi-node cluster (ray.cluster_utils.Cluster: several raylets on this machine sharing its
disk, as nodes share a cohort's storage): `distlocal prepare --executor ray` and `distlocal predict --executor ray`.
One cluster for the module: each start costs 10-20 s on 2 cores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from distlocal.bench.loading import MARGIN, auto_picks, loaders_needed
from distlocal.cli import main
from distlocal.config import ConfigError
from distlocal.config_load import load_config
from distlocal.data import read_manifest
from distlocal.data.loader import SlideLoader
from distlocal.data.prepare import prepare_slides
from distlocal.data.prepare_ray import prepare_entry, prepare_on_ray
from distlocal.engine.actor import StageActor
from distlocal.engine.loader_plan import auto_loaders
from distlocal.engine.local import LocalExecutor
from distlocal.engine.ray_executor import RayExecutor
from distlocal.engine.trainer import Trainer, epoch_order
from distlocal.model import build_stages
from distlocal.slides import SlideError
from distlocal.slides.cache import cache_key, read_cached
from tests.harness import simulated_cluster, write_manifest_rows
from tests.interrupt import slowed

WORKER_NODES = 2


@pytest.fixture(scope="module")
def cluster():
    """A head with one CPU (the driver's node) and two nodes of two CPUs each."""
    yield from simulated_cluster(WORKER_NODES)


def _with_a_truncated_slide(manifest: Path, folder: Path) -> tuple[Path, Path]:
    """
    (a copy of `manifest` with one more training slide, `truncated`, the file): the first third of a real slide's
    file, whose tiles end past the end of the file, as a copy cut short leaves it.
    """
    records = read_manifest(manifest).records
    with manifest.open(newline="") as handle:
        rows = [{**row, "path": str(record.path)} for row, record in zip(csv.DictReader(handle), records, strict=True)]
    whole = records[0].path.read_bytes()
    (bad := folder / "truncated.tiff").write_bytes(whole[:len(whole) // 3])
    rows.append({**rows[0], "slide_id": "truncated", "path": str(bad), "split": "train", "patient_id": "truncated"})
    return write_manifest_rows(folder / "cohort.csv", rows), bad


def _entries(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".tiff", ".json")
            and p.name not in ("prepare.json",)}


def test_prepare_over_two_nodes_equals_local_and_a_rerun_does_nothing(on_cluster, manifest, tmp_path):
    """Every slide is prepared once, on both nodes, into entries equal byte for byte to a local prepare's."""
    _, nodes = on_cluster
    ids = [r.slide_id for r in read_manifest(manifest).records]
    prepare_slides(read_manifest(manifest).records, tmp_path / "local", load_config(None, []).data)
    assert main(["prepare", str(manifest), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    report = json.loads((tmp_path / "ray" / "prepare.json").read_text())
    assert (report["executor"], report["prepared"], report["reused"], report["lost"]) == ("ray", len(ids), 0, [])
    assert {n.node_id for n in nodes} <= set(report["nodes"])  # spread: both worker nodes took slides
    assert sum(report["nodes"].values()) == len(ids)
    ours, theirs = _entries(tmp_path / "ray"), _entries(tmp_path / "local")
    assert len(theirs) == 2 * len(ids)
    assert ours == theirs
    assert not list((tmp_path / "ray").glob("*.partial"))
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir() if p.name in theirs}

    assert main(["prepare", str(manifest), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    again = json.loads((tmp_path / "ray" / "prepare.json").read_text())
    assert (again["prepared"], again["reused"], again["nodes"]) == (0, len(ids), {})
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir() if p.name in written} == written

    # A truncated slide joins the cohort: under on_error=skip it is listed with its reason, and the call succeeds.
    cohort, bad = _with_a_truncated_slide(manifest, tmp_path)
    assert main(["prepare", str(cohort), "--out", str(tmp_path / "ray"), "--executor", "ray",
                 "--set", "data.on_error=skip"]) == 0
    third = json.loads((tmp_path / "ray" / "prepare.json").read_text())
    assert (third["prepared"], third["reused"], third["skipped"]) == (0, len(ids), 1)
    [skipped] = third["skipped_slides"]
    assert (skipped["slide_id"], skipped["path"]) == ("truncated", str(bad))
    assert "truncated file" in skipped["reason"]
    assert "truncated," in (tmp_path / "ray" / "skipped.csv").read_text()


def test_prepare_loses_nothing_when_a_node_goes_mid_way(on_cluster, manifest, tmp_path):
    """A node removed while its slides are being prepared: they are prepared on the nodes left, none is lost."""
    sim, nodes = on_cluster
    records, data = read_manifest(manifest).records, load_config(None, []).data
    outcome: dict = {}

    def run():
        try:
            outcome["report"] = prepare_on_ray(records, tmp_path / "cache", data, task=slowed(prepare_entry, 1.5))
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "cache").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = nodes[1]
    try:
        sim.remove_node(victim)  # its two running tasks die with it
        thread.join(timeout=300)
    finally:
        nodes[1] = sim.add_node(num_cpus=2, num_gpus=0)  # the module's cluster whole again for the next test
        sim.wait_for_nodes()
    assert not thread.is_alive()
    assert "report" in outcome, outcome.get("error")
    report = outcome["report"]
    assert sorted(report.prepared) == sorted(r.slide_id for r in records)
    assert report.lost == []
    for record in records:
        assert read_cached(tmp_path / "cache", record.slide_id, cache_key(record.path, 5.0, None, None)) is not None


@pytest.fixture(scope="module")
def checkpoint(manifest, tmp_path_factory):
    """A tiny trained run (ResNet18 in two stages, one epoch, locally): only its predictions matter here."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["train.device=cpu", "train.epochs=1", "model.backbone=resnet18", "model.k=2",
                             "model.split=balanced", "model.rfr.patch_size=16", f"data.manifest={manifest}",
                             "tracking.enabled=false", "train.heatmaps=0"])
    Trainer(cfg, run_dir).fit()
    return run_dir / "checkpoints" / "best"


_TIMES = ("read_s", "forward_s", "head_s")  # measured, not computed: they differ from run to run


def _rows(out: Path) -> list[dict]:
    with (out / "predictions.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in _TIMES} for row in csv.DictReader(handle)]


def _predict(checkpoint: Path, manifest: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), str(manifest), *extra])


def test_cluster_predict_after_an_interruption_does_only_the_rest(on_cluster, actor_threads, checkpoint, manifest,
                                                                  tmp_path):
    """
    Two models on the cluster. A run stopped half-way (an unreadable slide under on_error=fail), the slide fixed, run
    again: the rerun predicts only the slides without a row; predictions.csv is then the local one's row for row, in
    manifest order, and so are the heatmaps.
    """
    # One test for both claims (cluster predict equals local; a rerun does only the rest): each Ray predict starts
    # two models (actors that import torch), and the completed run is the one to compare with a local run.
    records = read_manifest(manifest).records
    broken = records[6]
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row, record in zip(rows, records, strict=True):
        row["path"] = str(tmp_path / "broken.tiff" if record is broken else record.path)
    cohort = write_manifest_rows(tmp_path / "cohort.csv", rows)
    (tmp_path / "broken.tiff").write_bytes(b"not a slide")
    ray_args = ("--executor", "ray", "--actors", "2")
    assert _predict(checkpoint, cohort, tmp_path / "ray", *ray_args) == 2  # the bad slide stops the run
    log = tmp_path / "ray" / "predictions.rows.jsonl"
    first = [json.loads(line)["row"]["slide_id"] for line in log.read_text().splitlines()]
    assert 0 < len(first) < len(records)
    assert broken.slide_id not in first

    shutil.copy(broken.path, tmp_path / "broken.tiff")  # fixed
    assert _predict(checkpoint, cohort, tmp_path / "ray", *ray_args) == 0
    every = [json.loads(line)["row"]["slide_id"] for line in log.read_text().splitlines()]
    assert every[:len(first)] == first
    assert sorted(every) == sorted(r.slide_id for r in records)  # each slide predicted once over both runs
    assert _predict(checkpoint, cohort, tmp_path / "ray", *ray_args) == 0  # a third run has nothing to do
    assert len(log.read_text().splitlines()) == len(records)

    assert _predict(checkpoint, cohort, tmp_path / "local", "--executor", "local") == 0
    ours, theirs = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert [r["slide_id"] for r in ours] == [r.slide_id for r in records]
    assert ours == theirs
    summary = json.loads((tmp_path / "ray" / "predictions.json").read_text())
    assert (summary["actors"], summary["slides"]) == (2, len(ours))
    assert sorted(p.name for p in (tmp_path / "ray" / "heatmaps").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "heatmaps").iterdir())


def _float64_actor() -> type:
    """A stage actor computing and sending activations in float64: runs that do the same sums agree exactly."""

    class Float64Actor(StageActor):  # made in a function: Ray ships the class by value
        def __init__(self, *args):
            super().__init__(*args)
            self.stage.modules.double()
            self.activation_dtype = torch.float64

    return Float64Actor


def _epoch(manifest: Path, run_dir: Path, loaders: int = 1):
    """(config, epoch 0's training slides in the seed's order) of K=2 under data.on_error=skip, a stage a node."""
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"run.dir={run_dir}", "train.device=cpu", "train.executor=ray",
        "model.backbone=resnet18", "model.k=2", "model.split=balanced", "train.accumulate=3",
        "model.rfr.patch_size=16", "tracking.enabled=false", "train.placement=spread", "train.cpus_per_stage=1",
        "train.placement_timeout_s=60", f"train.loaders={loaders}", "data.on_error=skip"])
    train = read_manifest(manifest).split("train")
    return cfg, [train[i] for i in epoch_order(len(train), cfg.train.seed, 0)]


def _train_epoch(manifest: Path, run_dir: Path, loaders: int) -> dict:
    """
    One epoch of K=2 (a stage on each of two nodes) fed by `loaders` loaders, under data.on_error=skip: results,
    skips, states and traces. Then the same slides, the bad one first, under on_error=fail: the error.
    """
    cfg, records = _epoch(manifest, run_dir, loaders)
    executor = RayExecutor(cfg, 2, actor_cls=_float64_actor())
    try:
        loader = SlideLoader(cfg.data, True, cfg.train.seed)  # the trainer's: its skips go into summary.json
        results = list(executor.train(records, loader, 0))
        out = {"order": [r.slide_id for r in records], "results": [slide for slide, _ in results],
               "stage1": [slide for kind, slide, *_ in executor.traces()[0] if kind == "train"],
               "loaders": executor.feed.traces(), "states": executor.state_dicts(), "skipped": loader.skipped}
        failing = SlideLoader(dataclasses.replace(cfg.data, on_error="fail"), True, cfg.train.seed)
        with pytest.raises(SlideError) as failed:
            list(executor.train(sorted(records, key=lambda r: r.slide_id != "truncated"), failing, 1))
        return {**out, "failed": str(failed.value)}
    finally:
        executor.close()


def test_two_loaders_on_two_nodes_feed_every_slide_once_in_order_as_one_loader(on_cluster, actor_threads, manifest,
                                                                                tmp_path):
    """
    Two loaders, one on each stage's node: each slide is loaded once, stage 1 trains them in the seed's order, and
    the stages end as the local executor's do, one slide at a time from one loader in the driver (float64: the
    same sums; a slide lost, repeated or reordered moves weights by ~lr). A truncated slide among them is skipped
    with its reason under data.on_error=skip, and stops the run naming its file under fail.
    """
    cohort, bad = _with_a_truncated_slide(manifest, tmp_path)
    two = _train_epoch(cohort, tmp_path / "two", 2)
    assert "truncated" in two["order"]
    assert two["results"] == two["stage1"] == [slide for slide in two["order"] if slide != "truncated"]
    [skipped] = two["skipped"]
    assert (skipped.slide_id, skipped.path) == ("truncated", str(bad))
    assert "truncated file" in skipped.reason
    assert str(bad) in two["failed"]
    assert "truncated file" in two["failed"]
    loaded = [slide for trace in two["loaders"] for slide, *_ in trace["loads"]]
    assert sorted(loaded) == sorted(two["order"])  # every slide once (the truncated one tried once)
    assert all(trace["loads"] for trace in two["loaders"])  # both loaders worked
    assert len({trace["node_id"] for trace in two["loaders"]}) == 2
    cfg, records = _epoch(cohort, tmp_path / "local")
    local = LocalExecutor(build_stages(cfg, 2, "cpu"))
    for stage in local.stages:
        stage.modules.double()
    loader = SlideLoader(cfg.data, True, cfg.train.seed)
    assert [slide for slide, _ in local.train(records, loader, 0)] == two["results"]
    assert [s.slide_id for s in loader.skipped] == ["truncated"]
    for ours, theirs in zip(two["states"], local.state_dicts(), strict=True):
        assert ours["optim"]["steps"] == theirs["optim"]["steps"]
        for name, tensor in theirs["modules"].items():  # float64: ~1e-16 relative from summation order at most
            torch.testing.assert_close(ours["modules"][name], tensor, rtol=1e-9, atol=1e-11, msg=name)


def test_loaders_needed_cover_the_stage_rate_with_the_margin():
    """The loader count for a stage rate delivers at least 1.2x it, and one loader fewer would not."""
    for stage_rate, per_loader in [(50.0, 8.0), (50.0, 2.86), (1.0, 3.0), (12.0, 12.0), (10.0, 4.0)]:
        n = loaders_needed(stage_rate, per_loader)
        assert n * per_loader >= MARGIN * stage_rate - 1e-9
        assert n == 1 or (n - 1) * per_loader < MARGIN * stage_rate
    assert loaders_needed(50.0, 8.0) == 8
    with pytest.raises(ValueError, match="must be positive"):
        loaders_needed(5.0, 0.0)


def test_auto_loaders_deliver_the_margin_over_the_slowest_stage_within_the_free_cpus():
    """train.loaders=auto's count: 1.2x the slowest stage's slides/s at one loader's read rate, within the free CPUs."""
    assert auto_loaders(stage_s=0.02, read_s=0.35, cpus=64) == 21  # 50 slides/s, 0.35 s a cached slide: 21 x 2.86
    assert auto_loaders(stage_s=0.02, read_s=0.35, cpus=8) == 8  # the cluster's free CPUs cap it
    assert auto_loaders(stage_s=0.5, read_s=0.1, cpus=8) == 1  # a slow stage: one loader is plenty
    assert auto_loaders(stage_s=0.1, read_s=0.1, cpus=0) == 1  # no CPU left by the stages: one all the same
    assert auto_loaders(stage_s=0.1, read_s=0.12, cpus=8) == 2  # 1 loader gives 0.83x the stage, 2 give 1.67x


def test_auto_loaders_outside_a_training_run_ask_for_a_number(manifest):
    """An executor built without the trainer (a bench, a script) cannot measure for auto: it says to give a count."""
    cfg = load_config(None, [f"data.manifest={manifest}", "train.executor=ray", "train.loaders=auto"])
    with pytest.raises(ConfigError, match=r"train\.loaders=auto is set by distlocal train .* e\.g\. train\.loaders=2"):
        RayExecutor(cfg, 2)


def test_bench_loading_reports_autos_pick_measured_where_run_else_computed():
    """Bench loading's auto column: auto's count per stage rate, delivering 1.2x up to 50 slides/s where computed."""
    rows = [{"source": "cache", "loaders": n, "threads": 2, "slides_per_s": rate} for n, rate in ((1, 4.0), (2, 5.5))]
    picks = auto_picks(0.31, "cache", rows, cpus=2)  # a probe's 0.31 s per slide
    assert [(p["stage_rate"], p["loaders"], p["here"]) for p in picks] == [
        (1.0, 1, 1), (5.0, 2, 2), (10.0, 4, 2), (25.0, 10, 2), (50.0, 19, 2)]
    assert [(p["how"], p["delivers"]) for p in picks[:2]] == [("measured", 4.0), ("measured", 5.5)]
    for pick in picks[2:]:
        assert pick["how"] == "computed"
        assert pick["delivers"] == pytest.approx(pick["loaders"] / 0.31, abs=0.01)
        assert pick["delivers"] >= MARGIN * pick["stage_rate"]


def test_a_lost_loader_is_restarted_and_the_epoch_completes_in_order(on_cluster, manifest, tmp_path):
    """One of two loaders killed mid-epoch: Ray restarts it and retries its loads; stage 1 gets every slide in order."""
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"run.dir={tmp_path}", "train.device=cpu", "train.executor=ray",
        "model.backbone=resnet18", "model.k=2", "model.split=balanced", "train.accumulate=3",
        "model.rfr.patch_size=16", "tracking.enabled=false", "train.placement=spread", "train.cpus_per_stage=1",
        "train.placement_timeout_s=60", "train.loaders=2"])
    records = read_manifest(manifest).split("train")
    executor = RayExecutor(cfg, 2)
    try:
        before = executor.feed.traces()[1]
        results = []
        for slide, _ in executor.train(records, SlideLoader(cfg.data, True, cfg.train.seed), 0):
            results.append(slide)
            if len(results) == 2:
                ray.kill(executor.feed.actors[1], no_restart=False)  # as if its worker died
        after = executor.feed.traces()[1]
    finally:
        executor.close()
    assert results == [r.slide_id for r in records]
    assert after["pid"] != before["pid"]  # a new process: the loader was restarted
