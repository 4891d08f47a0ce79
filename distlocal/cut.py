"""
Where a backbone's residual blocks are cut into K stages: block counts only, no torch, so that a config resolves
its cut (model.blocks_per_stage) at load time, before the slow imports.

Example::

    stage_sizes(16, 4, "reference")  # [2, 3, 5, 6]: the paper's K=4 units over ResNet34
    stage_sizes(16, 3, "balanced")   # [5, 5, 6]
"""

from __future__ import annotations

__all__ = ["REFERENCE_UNITS", "stage_sizes"]

# Units of the reference implementation over ResNet34's 16 residual blocks
# (layer1: 0-2, layer2: 3-6, layer3: 7-12, layer4: 13-15); stage k of K runs units (k-1)g+1..kg, g = 8/K.
# The one place the cut is computed: the config records it, split_backbone (distlocal.model.backbone) uses it.
REFERENCE_UNITS = [[0], [1], [2], [3, 4], [5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]]


def stage_sizes(n_blocks: int, k: int, split: str) -> list[int]:
    """Blocks per stage for `split` (reference: the paper's units, K = 4 or 8 of ResNet34; balanced: equal counts)."""
    if split == "reference":
        g = len(REFERENCE_UNITS) // k
        return [sum(len(unit) for unit in REFERENCE_UNITS[i * g:(i + 1) * g]) for i in range(k)]
    # Equal block counts; the extra blocks go to the last stages, whose activations are smallest.
    return [n_blocks // k + (1 if i >= k - n_blocks % k else 0) for i in range(k)]
