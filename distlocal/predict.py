"""
`distlocal predict`: class probabilities and attention heatmaps for new slides, from a trained checkpoint.

Per slide: read it (distlocal's reader), run the Predictor (predictor.py), write a CSV row and its heatmaps; at the
end predictions.csv and predictions.json.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict
from pathlib import Path

from distlocal.data import ManifestError, SlideLoader, SlideRecord, read_manifest
from distlocal.predictor import Predictor, elapsed
from distlocal.progress import progress
from distlocal.slides import SlideError

__all__ = ["Predictor", "elapsed", "predict", "slide_records"]

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
            heatmaps: bool = True, device: str | None = None) -> dict:
    """Predict every slide of ``inputs``; write predictions.csv, heatmaps/ and predictions.json to ``out_dir``."""
    from distlocal.plots import attention_heatmap

    predictor = Predictor.load(checkpoint, overrides, device)
    cfg, classes = predictor.cfg, predictor.classes
    records = slide_records(inputs, classes)
    out_dir = Path(out_dir)
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    loader = SlideLoader(cfg.data, train=False)
    aux = cfg.predict.aux_heatmaps and heatmaps
    rows = []
    bar = progress(records, desc="predict", unit="slide")
    for record in bar:
        start = time.perf_counter()
        try:
            image = loader.read(record)  # read once: the tensor and the heatmap's thumbnail both come from it
        except SlideError as exc:
            loader.skip(record, exc)
            continue
        x = loader.to_input(image, record, device=predictor.input_device(*image.shape[:2]))
        read_s = time.perf_counter() - start
        result = predictor(x, aux=aux)
        probs, decided = result["probs"], predictor.choice.name
        predicted = int(probs.argmax())
        row = {"slide_id": record.slide_id, "path": str(record.path), "predicted": classes[predicted],
               **{f"prob_{c}": round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
               "label": classes[record.label] if record.label >= 0 else "",
               "correct": "" if record.label < 0 else int(predicted == record.label), "classifier": decided,
               "height": image.shape[0], "width": image.shape[1], "read_s": round(read_s, 4),
               "forward_s": round(result["forward_s"], 4), "head_s": round(result["head_s"], 4)}
        rows.append(row)
        bar.set_postfix(read=f"{read_s:.2f}s", forward=f"{result['forward_s']:.2f}s", head=f"{result['head_s']:.3f}s")
        if heatmaps:
            title = f"{record.slide_id}: {classes[predicted]} (p = {float(probs[predicted]):.2f}, {decided})"
            title += f", label {row['label']}" if row["label"] else ""
            shown = result["attention_of"]
            attention_heatmap(image, result["attention"], out_dir / "heatmaps" / f"{record.slide_id}.png", title,
                              label=f"{shown} attention")
            for name, attention in result["attentions"].items() if aux else ():
                if name != shown:
                    attention_heatmap(image, attention, out_dir / "heatmaps" / f"{record.slide_id}_{name}.png",
                                      f"{title} - {name}", label=f"{name} attention")
    _write_csv(out_dir / "predictions.csv", rows)
    summary = _summary(rows, [asdict(s) for s in loader.skipped], predictor, checkpoint)
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _summary(rows: list[dict], skipped: list[dict], predictor: Predictor, checkpoint) -> dict:
    labelled = [r for r in rows if r["correct"] != ""]
    mean = {k: sum(r[k] for r in rows) / len(rows) if rows else 0.0 for k in ("read_s", "forward_s", "head_s")}
    return {"checkpoint": str(checkpoint), "slides": len(rows), "skipped": skipped, "device": str(predictor.device),
            "max_tile_pixels": predictor.max_tile_pixels, "classifier": predictor.choice.name,
            "stages_run": predictor.choice.depth, "best_classifier": predictor.best_classifier,
            "accuracy": sum(r["correct"] for r in labelled) / len(labelled) if labelled else None,
            "labelled": len(labelled), "mean_seconds": mean}
