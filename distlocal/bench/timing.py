"""
What both inference benches (in memory: inference.py; from the file: deployed.py) share: ours timed on one
image, each method's GFLOP, and how their times are shown.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from distlocal.bench.patch_mil import PATCH, PatchMIL
from distlocal.data import SlideLoader
from distlocal.predictor import Predictor

__all__ = ["gflops", "ours_from_image", "timings", "seconds"]


def ours_from_image(predictor: Predictor, loader: SlideLoader, image: np.ndarray) -> dict:
    """``distlocal predict``'s steps after the read: normalisation, F_1 .. F_K and H (seconds and probabilities)."""
    start = time.perf_counter()
    x = loader.to_input(image, device=predictor.input_device(*image.shape[:2]))
    result = predictor(x)  # synchronises the device before it returns
    total = time.perf_counter() - start
    return {"prediction_s": total, "input_s": total - result["forward_s"] - result["head_s"],
            "forward_s": result["forward_s"], "head_s": result["head_s"], "total_s": total,
            "probs": result["probs"]}


@torch.no_grad()
def gflops(predictor: Predictor, baseline: PatchMIL, height: int, width: int, tiles: int) -> dict:
    """
    GFLOP of each method on one slide, counted from the shapes on the meta device (nothing is computed).

    Their ratio is the speed gain a device that runs both at the same FLOP/s would show: it separates what the
    method saves from how well a device runs large maps against batches of tiles.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def count(module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        with FlopCounterMode(display=False) as counter:
            out = copy.deepcopy(module).to("meta")(x)
        return counter.get_total_flops() / 1e9, out

    ours, x = 0.0, torch.empty(1, 3, height, width, device="meta")
    for i, (features, classifier) in enumerate(predictor.parts[:predictor.choice.depth]):  # early exit at A_i
        flops, x = count(features, x)
        ours += flops
        if i in predictor.choice.members:
            ours += count(classifier, x)[0]
    tile = torch.empty(1, 3, PATCH, PATCH, device="meta")
    dim = baseline.classifier.embed[0].in_features
    patch = tiles * count(baseline.features, tile)[0]
    patch += count(baseline.classifier, torch.empty(tiles, dim, device="meta"))[0]
    return {"gabmil": patch, "ours": ours}


def timings(run: dict) -> dict:
    """A run's timings only (its *_s keys), for the report's JSON."""
    return {k: v for k, v in run.items() if k.endswith("_s")}


def seconds(value: float) -> str:
    """A time for the tables."""
    return "<0.01 s" if value < 0.01 else f"{value:.2f} s"
