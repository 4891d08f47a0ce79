"""
model.split=auto: profile every residual block on a real slide and cut the backbone where the slowest stage is
fastest, since the pipeline's throughput is set by its slowest stage.

A stage ending at block e also pays for its classifier (A_i, or H at the end) on e's output, so that cost is
profiled per block too. The cut is exact (dynamic programming over contiguous splits).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distlocal.config import Config
from distlocal.model.backbone import build_backbone, freeze_batchnorm
from distlocal.model.mil import AuxClassifier, classifier_kernel

__all__ = ["BlockCost", "Plan", "allreduce_seconds", "best_split", "pipeline_plan", "plan_pipeline", "profile_blocks"]

log = logging.getLogger(__name__)


@dataclass
class BlockCost:
    block: int
    seconds: float  # forward + backward of the block on the sample slide
    classifier_seconds: float  # forward + backward of a classifier on the block's output
    memory_mb: float  # CUDA peak memory of the block's step (0 on CPU)
    param_bytes: int = 0  # trainable parameters of the block and of a classifier on its output: what replicas sum


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
        params = sum(p.numel() * p.element_size() for m in (block, classifier) for p in m.parameters()
                     if p.requires_grad)
        costs.append(BlockCost(index, seconds, classifier_seconds, memory, params))
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


@dataclass
class Plan:
    """A pipeline of stages with replicas, and what the cost model predicts for it."""

    blocks_per_stage: list[int]
    replicas: list[int]
    stage_s: list[float]  # seconds per slide of each stage, its replicas and its all-reduce counted
    slides_per_s: float  # 1 / the slowest stage's seconds per slide

    @property
    def busy(self) -> list[float]:
        """Each stage's predicted busy fraction: the others wait for the slowest."""
        slowest = max(self.stage_s)
        return [s / slowest for s in self.stage_s]


def allreduce_seconds(nbytes: float, replicas: int, bytes_per_s: float) -> float:
    """A ring all-reduce of `nbytes` over `replicas` ranks: each sends and receives 2 (R-1)/R of the bytes."""
    return 0.0 if replicas == 1 else 2 * (replicas - 1) / replicas * nbytes / bytes_per_s


def _stage_cost(costs: list[BlockCost], accumulate: int, bytes_per_s: float):
    """cost(i, j, r): seconds per slide of a stage of blocks i..j-1 (and its classifier on block j-1) in r replicas."""
    prefix, params = [0.0], [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c.seconds)
        params.append(params[-1] + c.param_bytes)

    def cost(i: int, j: int, r: int) -> float:
        seconds = prefix[j] - prefix[i] + costs[j - 1].classifier_seconds
        if r == 1:  # exactly best_split's stage cost, so that with as many devices as stages both cut alike
            return seconds
        return (math.ceil(accumulate / r) * seconds + allreduce_seconds(params[j] - params[i], r, bytes_per_s)) \
            / accumulate

    return cost


def pipeline_plan(costs: list[BlockCost], blocks_per_stage: list[int], replicas: list[int], accumulate: int,
                  bytes_per_s: float = 10e9) -> Plan:
    """
    What the cost model predicts for a pipeline as configured (its cut and replicas, not chosen): the stage times
    plan_pipeline would give it, for train.loaders=auto to set the loaders against the slowest stage.
    """
    cost = _stage_cost(costs, accumulate, bytes_per_s)
    starts = [sum(blocks_per_stage[:i]) for i in range(len(blocks_per_stage))]
    stage_s = [cost(b, b + size, r) for b, size, r in zip(starts, blocks_per_stage, replicas, strict=True)]
    return Plan(list(blocks_per_stage), list(replicas), stage_s, 1.0 / max(stage_s))


def plan_pipeline(costs: list[BlockCost], devices: int, accumulate: int, k: int | None = None,
                  blocks_per_stage: list[int] | None = None, memory_mb: float = math.inf,
                  bytes_per_s: float = 10e9) -> Plan:
    """
    The cut and the replicas per stage that train fastest on `devices` devices, each stage within `memory_mb`.

    A window of `accumulate` slides is a barrier: R replicas of a stage take ceil(A/R) of its slides each, then
    all-reduce its gradients, so the stage costs ceil(A/R)/A x (its blocks + classifier) + all-reduce / A per slide.
    Dynamic programming over (stages, blocks used, devices used), exact like best_split, which it equals when
    `devices` == K. `k` fixes the number of stages (None: any), `blocks_per_stage` fixes the cut. A stage's memory
    is the sum of its blocks' peaks (activations kept for backward add up); replicas do not change it.

    Example::

        plan = plan_pipeline(profile, devices=8, accumulate=8, k=4)  # plan.replicas, e.g. [3, 2, 2, 1]
    """
    n = len(costs)
    cost, mem = _stage_cost(costs, accumulate, bytes_per_s), [0.0]
    for c in costs:
        mem.append(mem[-1] + c.memory_mb)
    ends = None if blocks_per_stage is None else {sum(blocks_per_stage[:i + 1]) for i in range(len(blocks_per_stage))}
    if blocks_per_stage is not None:
        k = len(blocks_per_stage)
    stages = range(1, min(n, devices) + 1) if k is None else [k]
    if not stages or max(stages) > min(n, devices):
        raise ValueError(f"cannot plan K={k} stages of {n} blocks on {devices} devices: each stage needs a block "
                         f"and a device")

    inf = float("inf")
    top = max(stages)
    # best[s][j][g]: the slowest stage of the best s-stage pipeline over blocks 0..j-1 on exactly g devices
    best = [[[inf] * (devices + 1) for _ in range(n + 1)] for _ in range(top + 1)]
    back = [[[(0, 0)] * (devices + 1) for _ in range(n + 1)] for _ in range(top + 1)]
    best[0][0][0] = 0.0
    for s in range(1, top + 1):
        for j in range(s, n + 1):
            if ends is not None and j not in ends:
                continue
            for g in range(s, devices + 1):
                for i in range(s - 1, j):
                    if mem[j] - mem[i] > memory_mb:
                        continue
                    for r in range(1, g - (s - 1) + 1):
                        value = max(best[s - 1][i][g - r], cost(i, j, r))
                        if value < best[s][j][g]:
                            best[s][j][g], back[s][j][g] = value, (i, r)
    # The fastest plan; on a tie the fewest stages, then the fewest devices.
    value, s, g = min((best[s][n][g], s, g) for s in stages for g in range(s, devices + 1))
    if value == inf:
        raise ValueError(f"no cut of {n} blocks into {list(stages)} stage(s) fits {memory_mb:g} MiB per device")
    sizes, replicas, j = [], [], n
    for stage in range(s, 0, -1):
        i, r = back[stage][j][g]
        sizes.append(j - i)
        replicas.append(r)
        j, g = i, g - r
    sizes.reverse()
    replicas.reverse()
    return pipeline_plan(costs, sizes, replicas, accumulate, bytes_per_s)
