"""
model.split=auto: profile every residual block on a real slide and cut the backbone where the slowest stage is
fastest, since the pipeline's throughput is set by its slowest stage.

A stage ending at block e also pays for its classifier (A_i, or H at the end) on e's output, so that cost is
profiled per block too. The cut is exact (dynamic programming over contiguous splits).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distlocal.config import Config
from distlocal.model.backbone import build_backbone, freeze_batchnorm
from distlocal.model.mil import AuxClassifier, classifier_kernel

__all__ = ["BlockCost", "best_split", "profile_blocks"]

log = logging.getLogger(__name__)


@dataclass
class BlockCost:
    block: int
    seconds: float  # forward + backward of the block on the sample slide
    classifier_seconds: float  # forward + backward of a classifier on the block's output
    memory_mb: float  # CUDA peak memory of the block's step (0 on CPU)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    fn()  # warm-up: allocator, kernels, caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return (time.perf_counter() - start) / repeats, memory


def profile_blocks(cfg: Config, num_classes: int, slide: torch.Tensor, device: torch.device | str = "cpu",
                   repeats: int = 2) -> list[BlockCost]:
    """Time each block (and a classifier on its output) on `slide` (1 x 3 x H x W), as a stage would run it."""
    device = torch.device(device)
    backbone = build_backbone(cfg.model, cfg.train.fold_batchnorm)
    x = slide.to(device)
    with torch.no_grad():
        x = backbone.stem.to(device).eval()(x)
    stem_width, costs = x.shape[-1], []
    for index, block in enumerate(backbone.blocks):
        block.to(device).train()
        freeze_batchnorm(block)
        inp = x.detach()

        def step(block=block, inp=inp):
            block.zero_grad(set_to_none=True)
            block(inp).float().mean().backward()

        seconds, memory = _timed(step, device, repeats)
        with torch.no_grad():
            x = block(inp)
        level = max(1, round(stem_width / x.shape[-1]))  # the map's stride relative to the stem output
        is_last = index == len(backbone.blocks) - 1
        make = AuxClassifier.head if is_last else AuxClassifier.auxiliary
        kernel = classifier_kernel(level, cfg.model.classifier_kernels)  # as the stage ending here would have
        classifier = make(x.shape[1], num_classes, kernel).to(device).train()
        out = x.detach()

        def classify(classifier=classifier, out=out):
            classifier.zero_grad(set_to_none=True)
            logits, _ = classifier(out)
            F.cross_entropy(logits.float(), torch.zeros(1, dtype=torch.long, device=device)).backward()

        classifier_seconds, _ = _timed(classify, device, repeats)
        costs.append(BlockCost(index, seconds, classifier_seconds, memory))
        block.cpu()
    return costs


def best_split(costs: list[BlockCost], k: int) -> tuple[list[int], list[float]]:
    """Blocks per stage minimising the slowest stage, and each stage's cost (its blocks plus its classifier)."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} blocks into {k} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c.seconds)

    def stage(i: int, j: int) -> float:  # blocks i..j-1 plus the classifier on block j-1
        return prefix[j] - prefix[i] + costs[j - 1].classifier_seconds

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], stage(i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    ends, j = [], n
    for s in range(k, 0, -1):
        ends.append(j)
        j = cut[s][j]
    ends.reverse()
    starts = [0, *ends[:-1]]
    return [e - b for b, e in zip(starts, ends, strict=True)], [stage(b, e) for b, e in zip(starts, ends, strict=True)]
