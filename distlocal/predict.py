"""
`distlocal predict`: class probabilities and attention heatmaps for new slides, from a trained checkpoint.

Per slide (predict_slide.py, here or in Ray actors: predict_ray.py): read it, run the Predictor (predictor.py), make
its CSV row and write its heatmaps; each row is logged as it comes (predict_resume.py); at the end predictions.csv
in the inputs' order and predictions.json.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from distlocal.data import ManifestError, SlideRecord, read_manifest
from distlocal.data.loader import SkippedSlide
from distlocal.engine.checkpoint import load_checkpoint
from distlocal.predict_resume import ResumeLog
from distlocal.predict_slide import SlidePredictor
from distlocal.predictor import Predictor, elapsed
from distlocal.progress import progress

__all__ = ["Predictor", "elapsed", "predict", "slide_records"]

logger = logging.getLogger(__name__)
_ROWS = "predictions.rows.jsonl"
_MODEL_FACTS = ("device", "max_tile_pixels", "classifier", "stages_run", "best_classifier", "actors", "nodes")
_SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".dcm")


def slide_records(inputs: list[str], classes: list[str]) -> list[SlideRecord]:
    """Manifests (every row, labels optional) and slide files, in the order given."""
    records: list[SlideRecord] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".csv":
            records.extend(read_manifest(path, classes, labels_optional=True).records)
        elif path.is_file() and path.suffix.lower() in _SLIDE_SUFFIXES:
            records.append(SlideRecord(path.stem, path.resolve(), -1, "", path.stem))
        elif not path.exists():
            raise ManifestError(f"{path} does not exist; give slide files or manifest CSVs")
        else:
            raise ManifestError(f"{path} is neither a manifest (.csv) nor a slide ({', '.join(_SLIDE_SUFFIXES)})")
    ids = [r.slide_id for r in records]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ManifestError(f"slide ids {duplicates[:5]} appear more than once in the inputs; outputs are named by "
                            f"slide id, so give each slide once (or rename the files)")
    return records


def predict(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, overrides: list[str] = (),
            heatmaps: bool = True, device: str | None = None, executor: str = "local", actors: int | None = None,
            cpus_per_actor: int = 1) -> dict:
    """
    Predict every slide of ``inputs``; write predictions.csv, heatmaps/ and predictions.json to ``out_dir``.

    ``executor="ray"``: one model per device of the Ray cluster (predict_ray.py). Either way each finished row is
    logged at once (predictions.rows.jsonl), so a run stopped half-way and started again predicts only the rest.
    """
    out_dir = Path(out_dir)
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    classes = load_checkpoint(checkpoint, stages=False).classes
    records = slide_records(inputs, classes)
    log = ResumeLog(out_dir / _ROWS, checkpoint, overrides)
    done = log.rows()
    todo = [r for r in records if r.slide_id not in done]
    if done:
        logger.info("%d of %d slide(s) already predicted in %s", len(records) - len(todo), len(records), out_dir)
    if not todo:  # nothing to predict: no model is loaded, the model's facts are the last run's
        run = _Done(out_dir / "predictions.json")
    elif executor == "ray":
        from distlocal.predict_ray import RayPredictors

        run = RayPredictors(checkpoint, list(overrides), out_dir, heatmaps, actors, cpus_per_actor, device,
                            most=len(todo))
    else:
        run = _LocalPredictor(SlidePredictor(Predictor.load(checkpoint, overrides, device), out_dir, heatmaps))
    skipped: list[SkippedSlide] = []
    start = time.perf_counter()  # the cohort's rate: after the models are loaded, to the last row
    try:
        with progress(total=len(todo), desc=f"predict ({executor})", unit="slide") as bar:
            for outcome in run(todo):
                bar.update()
                if isinstance(outcome, SkippedSlide):
                    skipped.append(outcome)
                    continue
                done[outcome["slide_id"]] = log.add(outcome)
                bar.set_postfix(read=f"{outcome['read_s']:.2f}s", forward=f"{outcome['forward_s']:.2f}s")
    finally:
        run.close()
    rows = [done[r.slide_id] for r in records if r.slide_id in done]  # manifest order, however they finished
    _write_csv(out_dir / "predictions.csv", rows)
    seconds = time.perf_counter() - start
    summary = _summary(rows, [asdict(s) for s in skipped], run.info, checkpoint)
    summary.update(executor=executor, predicted_now=len(todo) - len(skipped), seconds=round(seconds, 2),
                   slides_per_s=round((len(todo) - len(skipped)) / seconds, 3) if todo else None)
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=2))
    return summary


class _Done:
    """Every slide already predicted: no outcome to make."""

    def __init__(self, last_summary: Path):
        last = json.loads(last_summary.read_text()) if last_summary.is_file() else {}
        self.info = {k: last.get(k) for k in _MODEL_FACTS if k in last}

    def __call__(self, records: list[SlideRecord]) -> Iterator[dict | SkippedSlide]:
        return iter(())

    def close(self) -> None:
        pass


class _LocalPredictor:
    """The slides one after the other in this process."""

    def __init__(self, slides: SlidePredictor):
        self.slides, self.info = slides, slides.info()

    def __call__(self, records: list[SlideRecord]) -> Iterator[dict | SkippedSlide]:
        return map(self.slides, records)

    def close(self) -> None:
        pass


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _summary(rows: list[dict], skipped: list[dict], info: dict, checkpoint) -> dict:
    labelled = [r for r in rows if r["correct"] != ""]
    mean = {k: sum(r[k] for r in rows) / len(rows) if rows else 0.0 for k in ("read_s", "forward_s", "head_s")}
    return {"checkpoint": str(checkpoint), "slides": len(rows), "skipped": skipped, **info,
            "accuracy": sum(r["correct"] for r in labelled) / len(labelled) if labelled else None,
            "labelled": len(labelled), "mean_seconds": mean}
