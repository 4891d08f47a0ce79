"""Learning from scratch on a CPU: the backbone's random init keeps activations at unit scale and branches live."""

from __future__ import annotations

import pytest
import torch

from distlocal.model import build_stages


@pytest.mark.parametrize(("backbone", "split"), [("resnet18", "balanced"), ("resnet34", "reference"),
                                                 ("resnet50", "balanced")])
def test_random_init_keeps_activations_bounded_and_branches_live(make_cfg, backbone, split):
    """From scratch, every stage's output stays at unit scale and the last stage sees past the frozen stem's window."""
    stages = build_stages(make_cfg(f"model.backbone={backbone}", f"model.split={split}"), num_classes=2)
    x = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(0), requires_grad=True)
    h, scales = x, []
    for stage in stages:
        stage.modules.eval()
        if "stem" in stage.modules:
            h = stage.modules["stem"](h)
        h = stage.modules["backbone"](h)
        scales.append(h.pow(2).mean().sqrt().item())
    # BatchNorm is frozen at unit statistics: with torchvision's init (residual gain 1) ResNet34's RMS grows ~6x per
    # stage, to ~100 after the last one.
    assert all(0.05 < s < 3.0 for s in scales), scales
    # With zero-init residual branches each deep position would see only the stem's 13 x 13 px window.
    (grad,) = torch.autograd.grad(h[0, :, h.shape[2] // 2, h.shape[3] // 2].sum(), x)
    rows, cols = torch.nonzero(grad.abs().sum(1)[0], as_tuple=True)
    assert min(rows.max() - rows.min(), cols.max() - cols.min()) > 96
