"""
One slide's prediction: read it, run the Predictor, make its CSV row and write its heatmaps.

The same function serves `distlocal predict` in this process and in each Ray actor of `--executor ray`, so the
two give the same rows (predict_ray.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from distlocal.data import SlideLoader, SlideRecord
from distlocal.data.loader import SkippedSlide
from distlocal.data.regions import SlideRegions
from distlocal.predictor import Predictor
from distlocal.slides import SlideError
from distlocal.slides.region import thumbnail, thumbnail_step

__all__ = ["SlidePredictor"]


class SlidePredictor:
    """A Predictor with its slide loader and output folder: call it on a record for its row (or its skip)."""

    def __init__(self, predictor: Predictor, out_dir: str | Path, heatmaps: bool = True):
        self.predictor, self.out_dir, self.heatmaps = predictor, Path(out_dir), heatmaps
        self.loader = SlideLoader(predictor.cfg.data, train=False)
        self.aux = predictor.cfg.predict.aux_heatmaps and heatmaps

    def info(self) -> dict:
        """What predictions.json says of the model: the same for every actor of a cluster prediction."""
        p = self.predictor
        return {"device": str(p.device), "max_tile_pixels": p.max_tile_pixels, "classifier": p.choice.name,
                "stages_run": p.choice.depth, "best_classifier": p.best_classifier}

    def __call__(self, record: SlideRecord) -> dict | SkippedSlide:
        """The slide's predictions.csv row; a SkippedSlide when it cannot be read under data.on_error=skip."""
        predictor, classes = self.predictor, self.predictor.classes
        start = time.perf_counter()
        try:
            x, image = self._read(record)
        except SlideError as exc:
            self.loader.skip(record, exc)  # raises under on_error=fail
            return self.loader.skipped[-1]
        height, width = x.shape[-2:]
        read_s = time.perf_counter() - start
        try:
            result = predictor(x, aux=self.aux)
            if self.heatmaps and image is None:  # read by region: the heatmap's picture too, band by band
                image = thumbnail(x.source, thumbnail_step((height, width)))
        except SlideError as exc:  # read by region, a damaged tile shows only when the forward reads it
            self.loader.skip(record, exc)
            return self.loader.skipped[-1]
        finally:
            if isinstance(x, SlideRegions):
                x.close()
        probs, decided = result["probs"], predictor.choice.name
        predicted = int(probs.argmax())
        row = {"slide_id": record.slide_id, "path": str(record.path), "predicted": classes[predicted],
               **{f"prob_{c}": round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
               "label": classes[record.label] if record.label >= 0 else "",
               "correct": "" if record.label < 0 else int(predicted == record.label), "classifier": decided,
               "height": height, "width": width, "read_s": round(read_s, 4),
               "forward_s": round(result["forward_s"], 4), "head_s": round(result["head_s"], 4)}
        if self.heatmaps:
            self._heatmaps(record, image, result, row, classes[predicted], float(probs[predicted]))
        return row

    def _read(self, record: SlideRecord) -> tuple[torch.Tensor | SlideRegions, np.ndarray | None]:
        """
        (the slide's input, its decoded crop): whole when the whole-slide forward fits the device, so the crop is
        read once for both the tensor and the heatmap; else, or with model.stream on, by region (data/regions.py)
        with no crop (predictor.by_region): stage 1's tiles read their regions, as a streamed training's do.
        """
        regions = self.loader.regions(record)
        height, width = regions.shape[-2:]
        if self.predictor.by_region(height, width):
            return regions, None
        image = regions.source.read(0, height, 0, width)
        regions.close()
        return self.loader.to_input(image, device=self.predictor.input_device(height, width)), image

    def _heatmaps(self, record: SlideRecord, image, result: dict, row: dict, predicted: str, p: float) -> None:
        from distlocal.plots import attention_heatmap

        decided, folder = self.predictor.choice.name, self.out_dir / "heatmaps"
        title = f"{record.slide_id}: {predicted} (p = {p:.2f}, {decided})"
        title += f", label {row['label']}" if row["label"] else ""
        shown = result["attention_of"]
        attention_heatmap(image, result["attention"], folder / f"{record.slide_id}.png", title,
                          label=f"{shown} attention")
        for name, attention in result["attentions"].items() if self.aux else ():
            if name != shown:
                attention_heatmap(image, attention, folder / f"{record.slide_id}_{name}.png", f"{title} - {name}",
                                  label=f"{name} attention")
