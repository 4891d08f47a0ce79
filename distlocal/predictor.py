"""
The Predictor: a checkpoint's network as inference parts, F_1/A_1 .. F_K/H, run on one whole slide.

Inference runs F_1 .. F_i on the whole slide at once and then the deciding classifier (``predict.classifier``): H
after F_K as in the paper, an auxiliary A_i after F_i (early exit: the later stages never run), the run's best
validated one, or the ensemble of all. A slide too large for the device runs each stage as exact overlapping tiles
(``model.tiling``), with the maps between stages kept in host memory. Reading slides, the CSV and the heatmaps are
predict.py's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distlocal.classifiers import Choice, choose, classifier_name
from distlocal.config import Config
from distlocal.config_load import load_config
from distlocal.engine.checkpoint import for_restoring, load_checkpoint
from distlocal.model import StageInterface, build_stages
from distlocal.model.build import resolve_device
from distlocal.model.stage import autocast
from distlocal.model.stream import streamed_classifier
from distlocal.model.tiling import RegionInput, fit_tile, footprint, halo, tiled_forward

__all__ = ["Predictor", "elapsed"]


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
    def from_stages(cls, cfg: Config, classes: list[str], stages: list[StageInterface], device: torch.device,
                    best_classifier: str = "H") -> Predictor:
        """
        The inference parts of built stages (local stages or one end-to-end network), in eval mode;
        ``best_classifier`` is what predict.classifier=best means.
        """
        parts = [stage.inference_parts() for stage in stages]
        for features, classifier in parts:
            # NHWC: oneDNN's and cuDNN's fast layout for convolutions (~25 % faster on a CPU, tensor cores on GPUs)
            features.eval().to(memory_format=torch.channels_last)
            classifier.eval()
        choice = choose(cfg.predict.classifier, len(parts), best_classifier)
        run = [f for f, _ in parts[:choice.depth]]
        tile = cfg.predict.max_tile_pixels or _stream_tile_pixels(cfg, run) or fit_tile(run, device)
        return cls(cfg, classes, parts, device, tile, choice, best_classifier)

    def input_device(self, height: int, width: int) -> torch.device | None:
        """
        Where to build a slide's input: on the device when the whole slide runs at once there, so the maps between
        stages stay on it too; None (host memory) when it runs as tiles.
        """
        fits = self.max_tile_pixels is None or height * width <= self.max_tile_pixels
        return self.device if fits else None

    def by_region(self, height: int, width: int) -> bool:
        """
        Whether a slide is read region by region (data/regions.py), each tile of stage 1 reading its own region,
        as a streamed training's stage 1 does: with model.stream on, or when the slide runs as tiles anyway.
        """
        return self.cfg.model.stream != "off" or self.input_device(height, width) is None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor | RegionInput, aux: bool = False) -> dict:
        """
        For one 1 x 3 x H x W slide tensor, or the slide read by region: ``probs``, the deciding classifier's
        probabilities, and ``attention``, its attention map (H's for the ensemble, named by ``attention_of``);
        ``classifiers`` / ``attentions`` by name for every classifier computed (with ``aux``, every one up to the
        deciding depth); seconds in the stages, the deciding classifiers (``head_s``) and the others (``aux_s``).
        """
        bf16 = self.cfg.train.precision == "bf16" and self.device.type == "cuda"
        out = {"forward_s": 0.0, "head_s": 0.0, "aux_s": 0.0, "classifiers": {}, "attentions": {}}
        k, probs = len(self.parts), {}
        for i, (features, classifier) in enumerate(self.parts[:self.choice.depth]):  # A_i: stages 1..i only
            start = time.perf_counter()
            if isinstance(x, torch.Tensor):  # a slide read by region is read tile by tile (tiling.RegionInput)
                x = x.contiguous(memory_format=torch.channels_last)  # copies the slide only: stage outputs are NHWC
            with autocast(self.device, bf16):
                x = tiled_forward(features, x, self.max_tile_pixels, self.device)
            out["forward_s"] += elapsed(start, self.device)
            deciding = i in self.choice.members
            if deciding or aux:
                start = time.perf_counter()
                if self.max_tile_pixels is not None and x.shape[-2] * x.shape[-1] > self.max_tile_pixels:
                    # a map larger than a tile (a slide run as tiles): the classifier in tiles and chunks too, so
                    # the whole map never goes to the device
                    side = max(1, math.isqrt(self.max_tile_pixels) // classifier.kernel)
                    logits, attention = streamed_classifier(classifier, x, side, self.device,
                                                            lambda: autocast(self.device, bf16))
                else:
                    with autocast(self.device, bf16):
                        logits, attention = classifier(x)
                name = classifier_name(i, k)
                probs[i] = out["classifiers"][name] = torch.softmax(logits.float(), 1)[0].cpu()
                out["attentions"][name] = attention.float().cpu()
                out["head_s" if deciding else "aux_s"] += elapsed(start, self.device)
        out["probs"] = self.choice.combine(probs)
        out["attention_of"] = self.choice.attention_of(k)
        out["attention"] = out["attentions"][out["attention_of"]]
        return out


def _stream_tile_pixels(cfg: Config, features: list[nn.Module]) -> int | None:
    """
    With model.stream on and no predict.max_tile_pixels: tiles whose outputs cover model.stream_tile a side at every
    stage, halos added (an inference tile holds less than the training tile it was sized for: no gradients).
    """
    if cfg.model.stream == "off" or not isinstance(cfg.model.stream_tile, int):
        return None
    return max((cfg.model.stream_tile + 2 * halo(footprint(f))) ** 2 for f in features)


def elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start``, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
