"""Benchmarks behind `distlocal bench ...`: measurements for BENCHMARKS.md, never run as timed tests."""

from __future__ import annotations

import torch

__all__ = ["base_overrides"]


def base_overrides(device: torch.device) -> list[str]:
    """
    What every model benchmark sets first: random weights (speed and memory do not depend on them), the device,
    and bf16 on CUDA, as training and prediction run there.
    """
    return ["model.pretrained=none", f"train.device={device}", *(["train.precision=bf16"] if device.type == "cuda"
                                                                   else [])]
