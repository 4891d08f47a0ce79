"""
Prediction on new slides with a trained checkpoint: class probabilities and attention heatmaps.

Inference runs F_1 .. F_i on the whole slide at once and then the deciding classifier (``predict.classifier``): H
after F_K as in the paper, an auxiliary A_i after F_i (early exit: the later stages never run), the run's best
validated one, or the ensemble of all. A slide too large for the device runs each stage as exact overlapping tiles
(``model.tiling``), with the maps between stages kept in host memory.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from distlocal.classifiers import Choice, choose, classifier_name
from distlocal.config import Config, load_config
from distlocal.data import ManifestError, SlideLoader, SlideRecord, read_manifest
from distlocal.engine.checkpoint import for_restoring, load_checkpoint
from distlocal.model import build_stages
from distlocal.model.build import resolve_device
from distlocal.model.stage import autocast
from distlocal.model.tiling import tiled_forward
from distlocal.progress import progress
from distlocal.slides import SlideError

__all__ = ["Predictor", "elapsed", "predict", "slide_records"]

_SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".dcm")
_INDEX_LIMIT = 2**31 - 1  # elements: cuDNN and many CUDA kernels index a tensor with 32 bits


@dataclass
class Predictor:
    """
    The checkpoint's network as (feature extractor, classifier) pairs, F_1/A_1 .. F_K/H, and the classifier that
    decides (``choice``).
    """

    cfg: Config
    classes: list[str]
    parts: list[tuple[nn.Module, nn.Module]]
    device: torch.device
    max_tile_pixels: int | None
    choice: Choice
    best_classifier: str = "H"  # the one the checkpoint records as validated best

    @classmethod
    def load(cls, checkpoint: str | Path, overrides: list[str] = (), device: str | None = None) -> Predictor:
        ckpt = load_checkpoint(checkpoint)
        cfg = load_config(ckpt.path / "config.yaml", list(overrides))  # data / predict settings may change
        device = resolve_device(device or cfg.train.device)
        stages = build_stages(for_restoring(cfg), len(ckpt.classes), device)
        for stage, state in zip(stages, ckpt.stages, strict=True):
            stage.load_state_dict(state)
        return cls.from_stages(cfg, ckpt.classes, stages, device, ckpt.trainer.get("best_classifier", "H"))

    @classmethod
    def from_stages(cls, cfg: Config, classes: list[str], stages: list, device: torch.device,
                    best_classifier: str = "H") -> Predictor:
        """
        The inference parts of built stages (local stages or one end-to-end network), in eval mode;
        ``best_classifier`` is what predict.classifier=best means.
        """
        parts = []
        for stage in stages:
            if cfg.model.mode == "e2e":
                net = stage.net
                parts.append((nn.Sequential(net.stem, net.blocks), net.head))
            else:
                features = [stage.modules["stem"]] if "stem" in stage.modules else []
                parts.append((nn.Sequential(*features, stage.modules["backbone"]), stage.modules["classifier"]))
        for features, classifier in parts:
            # NHWC: oneDNN's and cuDNN's fast layout for convolutions (~25 % faster on a CPU, tensor cores on GPUs)
            features.eval().to(memory_format=torch.channels_last)
            classifier.eval()
        choice = choose(cfg.predict.classifier, len(parts), best_classifier)
        tile = cfg.predict.max_tile_pixels or _fit_tile(parts[:choice.depth], device)
        return cls(cfg, classes, parts, device, tile, choice, best_classifier)

    def input_device(self, height: int, width: int) -> torch.device | None:
        """
        Where to build a slide's input: on the device when the whole slide runs at once there, so the maps between
        stages stay on it too; None (host memory) when it runs as tiles.
        """
        fits = self.max_tile_pixels is None or height * width <= self.max_tile_pixels
        return self.device if fits else None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, aux: bool = False) -> dict:
        """
        For one 1 x 3 x H x W slide tensor: ``probs``, the deciding classifier's probabilities, and ``attention``,
        its attention map (H's for the ensemble, named by ``attention_of``); ``classifiers`` / ``attentions`` by
        name for every classifier computed (with ``aux``, every one up to the deciding depth); seconds in the
        stages, the deciding classifiers (``head_s``) and the others (``aux_s``).
        """
        bf16 = self.cfg.train.precision == "bf16" and self.device.type == "cuda"
        out = {"forward_s": 0.0, "head_s": 0.0, "aux_s": 0.0, "classifiers": {}, "attentions": {}}
        k, probs = len(self.parts), {}
        for i, (features, classifier) in enumerate(self.parts[:self.choice.depth]):  # A_i: stages 1..i only
            start = time.perf_counter()
            x = x.contiguous(memory_format=torch.channels_last)  # copies the slide only: stage outputs are NHWC
            with autocast(self.device, bf16):
                x = tiled_forward(features, x, self.max_tile_pixels, self.device)
            out["forward_s"] += elapsed(start, self.device)
            deciding = i in self.choice.members
            if deciding or aux:
                start = time.perf_counter()
                with autocast(self.device, bf16):
                    logits, attention = classifier(x.to(self.device))
                name = classifier_name(i, k)
                probs[i] = out["classifiers"][name] = torch.softmax(logits.float(), 1)[0].cpu()
                out["attentions"][name] = attention.float().cpu()
                out["head_s" if deciding else "aux_s"] += elapsed(start, self.device)
        out["probs"] = self.choice.combine(probs)
        out["attention_of"] = self.choice.attention_of(k)
        out["attention"] = out["attentions"][out["attention_of"]]
        return out


def elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start``, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _fit_tile(parts: list[tuple[nn.Module, nn.Module]], device: torch.device) -> int | None:
    """On CUDA, the largest tile (pixels) whose forward fits half the free memory; whole slides elsewhere."""
    if device.type != "cuda":
        return None
    per_pixel = 0.0
    for features, _ in parts:  # bytes per input pixel of the hungriest stage, measured on a 512 x 512 probe
        channels = next(m for m in features.modules() if isinstance(m, nn.Conv2d)).in_channels
        probe = torch.zeros(1, channels, 512, 512, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            features(probe)
        per_pixel = max(per_pixel, (torch.cuda.max_memory_allocated(device) - base) / 512**2)
        del probe
    free, _ = torch.cuda.mem_get_info(device)
    # On a large GPU the memory bound alone allows tiles with a tensor past 2**31 elements, which 32-bit indexing
    # cannot address: a later stage's input alone has 128-512 elements per pixel, conv1's output 16 on the slide.
    return min(int(0.5 * free / max(per_pixel, 1.0)), _index_tile(parts, device))


def _index_tile(parts: list[tuple[nn.Module, nn.Module]], device: torch.device, probe: int = 128) -> int:
    """The largest tile (pixels) whose every intermediate tensor stays under 2**31 elements, from a small probe."""
    per_pixel = 0.0
    for features, _ in parts:
        channels = next(m for m in features.modules() if isinstance(m, nn.Conv2d)).in_channels
        largest = [probe * probe * channels]

        def note(module, args, out, largest=largest):
            if isinstance(out, torch.Tensor):
                largest[0] = max(largest[0], out.numel())

        hooks = [m.register_forward_hook(note) for m in features.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                features(torch.zeros(1, channels, probe, probe, device=device))
        finally:
            for hook in hooks:
                hook.remove()
        per_pixel = max(per_pixel, largest[0] / probe**2)
    return int(_INDEX_LIMIT / per_pixel)


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
