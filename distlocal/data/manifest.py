"""
The manifest CSV: `slide_id,path,label,split[,patient_id]`, validated up front.

Labels may be class names or integers; the mapping to indices is stable (the configured class
order, else sorted names, else the integers themselves).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Manifest", "ManifestError", "SlideRecord", "read_manifest", "SPLITS"]

SPLITS = ("train", "valid", "test")
_REQUIRED = ("slide_id", "path", "label", "split")


class ManifestError(ValueError):
    """A manifest problem; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    path: Path  # absolute
    label: int
    split: str
    patient_id: str


@dataclass
class Manifest:
    path: Path
    records: list[SlideRecord]
    classes: list[str]

    def split(self, name: str) -> list[SlideRecord]:
        return [r for r in self.records if r.split == name]

    def missing(self, cache_dir: str | Path = "") -> list[SlideRecord]:
        """Records whose file does not exist (and, with a `cache_dir`, that were not prepared there either)."""
        from distlocal.slides.cache import entry_paths

        return [r for r in self.records if not r.path.exists()
                and not (cache_dir and entry_paths(cache_dir, r.slide_id)[1].is_file())]


def _class_list(labels: list[str], classes: list[str] | None) -> list[str]:
    if classes:
        return list(classes)
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return [str(i) for i in range(max(int(lab) for lab in labels) + 1)]
    return sorted(set(labels))


def _label_index(label: str, classes: list[str], where: str) -> int:
    if label in classes:
        return classes.index(label)
    if label.isdigit() and int(label) < len(classes):
        return int(label)
    raise ManifestError(f"{where}: label {label!r} is not one of the classes {classes}; fix the label or data.classes")


def read_manifest(path: str | Path, classes: list[str] | None = None, labels_optional: bool = False) -> Manifest:
    """
    Read and validate a manifest; relative slide paths are resolved against its folder.

    ``labels_optional`` (for prediction): the label and split columns may be missing or empty; a slide without a
    label gets label -1. Prediction passes the checkpoint's ``classes``; without them the labels name the classes.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; set data.manifest (distlocal synth writes one)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        required = ("slide_id", "path") if labels_optional else _REQUIRED
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"manifest {path} lacks column(s) {missing}; the header must be {','.join(required)}")
        rows = [({k: (v or "").strip() for k, v in row.items() if k}, n) for n, row in enumerate(reader, start=2)]
    if not rows:
        raise ManifestError(f"manifest {path} has no slides")
    labels = [row.get("label", "") for row, _ in rows]
    given = [label for label in labels if label]  # with labels_optional and no classes, the labelled rows name them
    class_list = _class_list(given, classes) if given or classes else []
    records, seen = [], {}
    for row, line in rows:
        where = f"{path} line {line} (slide {row['slide_id']!r})"
        if not row["slide_id"] or not row["path"]:
            raise ManifestError(f"{where}: slide_id and path must not be empty")
        if row["slide_id"] in seen:
            raise ManifestError(f"{where}: slide_id duplicates line {seen[row['slide_id']]}; slide ids must be unique")
        seen[row["slide_id"]] = line
        if not labels_optional and row["split"] not in SPLITS:
            raise ManifestError(f"{where}: split {row['split']!r} must be one of {', '.join(SPLITS)}")
        slide_path = Path(row["path"]).expanduser()
        slide_path = slide_path if slide_path.is_absolute() else (path.parent / slide_path).resolve()
        unlabelled = labels_optional and not row.get("label")
        label = -1 if unlabelled else _label_index(row["label"], class_list, where)
        patient = row.get("patient_id") or row["slide_id"]
        records.append(SlideRecord(row["slide_id"], slide_path, label, row.get("split", ""), patient))
    return Manifest(path, records, class_list)
