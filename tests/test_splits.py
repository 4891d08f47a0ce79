"""The split helper: stratified by class, grouped by patient, seeded, k folds, paths kept valid."""

import csv

import pytest

from distlocal.cli import main
from distlocal.data import read_manifest
from distlocal.data.splits import assign_folds, assign_splits


def _rows(n_patients=30, slides_per_patient=2):
    """Patients of three unbalanced classes, each with several slides."""
    labels = ["luad"] * 15 + ["lusc"] * 10 + ["normal"] * 5
    return [{"slide_id": f"p{p}_s{s}", "path": f"slides/p{p}_s{s}.svs", "label": labels[p % len(labels)],
             "patient_id": f"p{p}"} for p in range(n_patients) for s in range(slides_per_patient)]


def test_patients_never_straddle_splits_and_classes_are_stratified():
    """Every patient's slides share one split, and each class is split near 60/20/20."""
    rows = _rows()
    splits = assign_splits(rows, 0.2, 0.2, seed=3)
    by_patient = {}
    for row, split in zip(rows, splits, strict=True):
        assert by_patient.setdefault(row["patient_id"], split) == split
    for label, n in (("luad", 30), ("lusc", 20), ("normal", 10)):
        got = [s for r, s in zip(rows, splits, strict=True) if r["label"] == label]
        assert abs(got.count("train") - 0.6 * n) <= 2
        assert abs(got.count("test") - 0.2 * n) <= 2


def test_same_seed_same_split_other_seed_other_split():
    """Splits are a pure function of the seed."""
    rows = _rows()
    assert assign_splits(rows, seed=1) == assign_splits(rows, seed=1)
    assert assign_splits(rows, seed=1) != assign_splits(rows, seed=2)


def test_folds_partition_patients_evenly():
    """K folds hold every patient once and about 1/K of each class."""
    rows = _rows()
    folds = assign_folds(rows, 5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    for f in range(5):
        assert sum(1 for r, g in zip(rows, folds, strict=True) if g == f and r["label"] == "luad") == 6


def test_command_writes_fold_manifests_that_resolve_the_slides(tmp_path, capsys):
    """`distlocal split --folds 3` writes readable manifests whose slide paths still point at the slides."""
    source = tmp_path / "data" / "manifest.csv"
    (tmp_path / "data" / "slides").mkdir(parents=True)
    rows = _rows(12, 1)
    for r in rows:
        (tmp_path / "data" / r["path"]).write_bytes(b"")
    with source.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    assert main(["split", str(source), "--out", str(tmp_path / "cv"), "--folds", "3"]) == 0
    tests = set()
    for i in range(3):
        manifest = read_manifest(tmp_path / "cv" / f"fold{i}" / "manifest.csv")
        assert not manifest.missing()
        tests |= {r.slide_id for r in manifest.split("test")}
    assert tests == {r["slide_id"] for r in rows}  # every slide is tested exactly in one fold
    assert "fold2" in capsys.readouterr().out


def test_impossible_shares_are_refused():
    """Validation plus test shares that leave nothing to train on fail with the option names."""
    with pytest.raises(ValueError, match=r"--valid 0\.5 and --test 0\.5"):
        assign_splits(_rows(), 0.5, 0.5)
