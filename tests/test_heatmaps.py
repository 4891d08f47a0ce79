"""The attention heatmaps at the end of a run show every class, not the first few slides of the manifest."""

from __future__ import annotations

from pathlib import Path

from distlocal.commands.demo import CONFIG, DATASET
from distlocal.config_load import load_config
from distlocal.data import SlideRecord, read_manifest
from distlocal.engine.report import heatmap_slides
from distlocal.slides import write_synthetic_dataset


def _records(labels: list[int]) -> list[SlideRecord]:
    return [SlideRecord(f"s{i}", Path(f"/s{i}.tif"), label, "valid", f"p{i}") for i, label in enumerate(labels)]


def test_classes_are_taken_in_turn():
    """Slides listed class by class come out class 0, 1, 2, 0, ...; a class that runs out is skipped."""
    records = _records([0, 0, 0, 1, 1, 2])
    assert [r.slide_id for r in heatmap_slides(records, 5)] == ["s0", "s3", "s5", "s1", "s4"]
    assert [r.slide_id for r in heatmap_slides(records, 10)] == ["s0", "s3", "s5", "s1", "s4", "s2"]
    assert heatmap_slides(records, 0) == []


def test_the_demo_set_gets_both_classes(tmp_path):
    """The demo's slide set (its first three validation slides are class0) gets heatmaps of both classes."""
    settings = DATASET | {"size": [32, 32]}  # the split depends on the count and seed, not the size
    manifest = write_synthetic_dataset(tmp_path, slides=settings["slides"], classes=settings["classes"],
                                       size=tuple(settings["size"]), seed=settings["seed"], task=settings["task"])
    valid = read_manifest(manifest).split("valid")
    assert {r.label for r in valid[:3]} == {0}
    assert {r.label for r in heatmap_slides(valid, 3)} == {0, 1}


def test_shipped_configs_plot_a_heatmap_per_class():
    """Every shipped config asks for at least as many heatmaps as its task has classes."""
    for path in sorted(Path(CONFIG).parent.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.train.heatmaps >= len(cfg.data.classes or range(DATASET["classes"])), path.name
