"""
Train/valid/test splits and k folds for a manifest: stratified by class, grouped by patient, seeded.

All slides of a patient land in the same split (slides of one patient leaking across splits inflate test
scores). A patient counts under its most frequent label; within each class, patients are shuffled and each goes to
the split (or fold) furthest below its share of that class's slides.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from distlocal.data.manifest import SPLITS, ManifestError

__all__ = ["assign_folds", "assign_splits", "write_splits"]


def _patients(rows: list[dict]) -> dict[str, dict[str, list[int]]]:
    """Patients by label: {label: {patient: row indices}}, a patient under its most frequent label."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        members[row.get("patient_id") or row["slide_id"]].append(i)
    by_label: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for patient, indices in members.items():
        counts = Counter(rows[i]["label"] for i in indices)
        label = min(counts, key=lambda lab: (-counts[lab], lab))
        by_label[label][patient] = indices
    return by_label


def _allocate(rows: list[dict], shares: list[float], seed: int) -> list[int]:
    """Bin index per row: whole patients, each class filled towards `shares` of its slides."""
    rng = np.random.default_rng(seed)
    out = [0] * len(rows)
    for _, patients in sorted(_patients(rows).items()):
        names = sorted(patients)
        total = sum(len(v) for v in patients.values())
        targets = np.array(shares) * total
        filled = np.zeros(len(shares))
        for p in rng.permutation(len(names)):
            indices = patients[names[p]]
            deficit = targets - filled
            target = int(np.argmax(deficit - 1e-9 * np.arange(len(shares))))  # ties: the earlier bin
            filled[target] += len(indices)
            for i in indices:
                out[i] = target
    return out


def assign_splits(rows: list[dict], valid: float = 0.2, test: float = 0.2, seed: int = 0) -> list[str]:
    """The split (train, valid or test) of every row."""
    if valid < 0 or test < 0 or valid + test >= 1:
        raise ManifestError(f"--valid {valid} and --test {test} must be >= 0 and leave some slides for training")
    return [SPLITS[b] for b in _allocate(rows, [1 - valid - test, valid, test], seed)]


def assign_folds(rows: list[dict], folds: int, seed: int = 0) -> list[int]:
    """Fold number (0 .. folds-1) per row, each fold with about 1/folds of every class."""
    if folds < 2:
        raise ManifestError(f"--folds must be at least 2, got {folds}")
    return _allocate(rows, [1 / folds] * folds, seed)


def _read(manifest: Path) -> tuple[list[str], list[dict]]:
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist")
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
    missing = [c for c in ("slide_id", "path", "label") if c not in fields]
    if missing:
        raise ManifestError(f"manifest {manifest} lacks column(s) {missing}; it needs slide_id,path,label")
    if not rows:
        raise ManifestError(f"manifest {manifest} has no slides")
    return (fields if "split" in fields else [*fields, "split"]), rows


def _write(path: Path, fields: list[str], rows: list[dict], source: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            slide = Path(row["path"]).expanduser()
            slide = slide if slide.is_absolute() else (source.parent / slide).resolve()
            # Slide paths stay valid from the new manifest's folder.
            writer.writerow({**row, "path": os.path.relpath(slide, path.parent.resolve())})
    return path


def write_splits(manifest: str | Path, out_dir: str | Path, valid: float = 0.2, test: float = 0.2,
                 folds: int = 0, seed: int = 0) -> list[Path]:
    """
    Write OUT_DIR/manifest.csv with new splits, or with `folds` k >= 2, OUT_DIR/fold{i}/manifest.csv where fold i
    is the test set, fold i+1 the validation set and the rest training. Returns the written paths.
    """
    manifest, out_dir = Path(manifest), Path(out_dir)
    fields, rows = _read(manifest)
    if not folds:
        splits = assign_splits(rows, valid, test, seed)
        return [_write(out_dir / "manifest.csv", fields, [{**r, "split": s} for r, s in zip(rows, splits, strict=True)],
                       manifest)]
    fold_of = assign_folds(rows, folds, seed)
    written = []
    for i in range(folds):
        named = {i: "test", (i + 1) % folds: "valid"}
        fold_rows = [{**r, "split": named.get(f, "train")} for r, f in zip(rows, fold_of, strict=True)]
        written.append(_write(out_dir / f"fold{i}" / "manifest.csv", fields, fold_rows, manifest))
    return written
