"""Streamed stages (model.stream=on): a streamed training step is the whole-slide step, computed tile by tile."""

import pytest
import torch

from distlocal.model import build_stages
from distlocal.model.stream import streamed_backward
from distlocal.model.tiling import stitched_forward

# float64: the two steps differ only in summation order (~1e-16 relative); any real error (a position counted twice
# or not at all, a missing halo) is of the order of the gradient itself.
EXACT = {"rtol": 1e-9, "atol": 1e-11}


def _modules(stage):
    return stage.net if hasattr(stage, "net") else stage.modules


def _pair(make_cfg, *overrides):
    """(whole-slide stages, streamed stages), float64, identical weights; the driver steps, so gradients stay."""
    common = ["model.rfr.patch_size=8", "train.accumulate=1", *overrides]
    whole = build_stages(make_cfg(*common), 2)
    streamed = build_stages(make_cfg(*common, "model.stream=on"), 2)
    for stage in (*whole, *streamed):
        _modules(stage).double()
        stage.driver_steps = True
    assert all(s.streaming for s in streamed)
    assert not any(s.streaming for s in whole)
    return whole, streamed


def _assert_same_step(whole, streamed, x, y):
    """Each stage in turn: the same loss (CE and RFR), output, every gradient, and the optimizer's update."""
    for a, b in zip(whole, streamed, strict=True):
        out_a, m_a = a.train_step(x, y, (0, "s"))
        out_b, m_b = b.train_step(x, y, (0, "s"))
        for key in ("loss", "loss_cls", "loss_rec"):
            assert m_b[key] == pytest.approx(m_a[key], rel=EXACT["rtol"], abs=1e-12), key
        torch.testing.assert_close(out_b, out_a, **EXACT)
        named = list(_modules(a).named_parameters())
        trained = [(n, p, q) for (n, p), q in zip(named, _modules(b).parameters(), strict=True) if p.requires_grad]
        assert all(p.grad is not None for _, p, _ in trained)
        for name, p, q in trained:
            torch.testing.assert_close(q.grad, p.grad, **EXACT, msg=name)
        # AdamW's first step moves each weight by lr * g / (|g| + eps) (+ decay): a gradient difference d moves it
        # by at most lr * d / eps, so rounding-sized gradient differences give this much and no more.
        lr_over_eps = max(g["lr"] for g in a.optim.optimizer.param_groups) / a.optim.optimizer.defaults["eps"]
        allowed = {name: lr_over_eps * (q.grad - p.grad).abs().max().item() + 1e-15 for name, p, q in trained}
        assert a.optim.step()
        assert b.optim.step()
        for name, p, q in trained:
            torch.testing.assert_close(q, p, rtol=0, atol=allowed[name], msg=name)
        x = out_a


@pytest.mark.parametrize(("overrides", "size"), [
    # tiles of 48 slide px: 8 x 8 positions at stage 1 (24 x 16), 4 at stage 2 ...: they divide every map
    (("model.k=4", "model.stream_tile=48"), (144, 96)),
    (("model.k=8", "model.stream_tile=30"), (144, 96)),  # 5 positions at stage 1 (24 x 16): the last tiles are short
    (("model.k=1", "model.backbone=resnet50", "model.split=balanced", "model.stream_tile=60"), (132, 108)),
    (("model.k=4", "model.stream_tile=4096"), (96, 80)),  # a slide smaller than one tile
    (("model.mode=e2e", "model.stream_tile=60"), (96, 150)),  # StreamingCNN's end-to-end method
], ids=["k4-dividing", "k8-not-dividing", "resnet50-k1", "smaller-than-a-tile", "e2e"])
def test_streamed_step_equals_whole_slide_step(make_cfg, overrides, size):
    """In float64 the streamed step is the whole-slide step: losses, output maps, gradients and the update."""
    whole, streamed = _pair(make_cfg, *overrides)
    slide = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _assert_same_step(whole, streamed, slide, 1)


def test_rfr_crops_gradients_join_the_streamed_backward(make_cfg):
    """RFR alone (no classification loss): its gradient reaches F_1 only through the crops, and matches."""
    whole, streamed = _pair(make_cfg, "model.k=2", "model.backbone=resnet18", "model.split=balanced",
                            "model.stream_tile=36", "model.rfr.alpha=1.0")
    slide = torch.randn(1, 3, 160, 136, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for stage in (whole[0], streamed[0]):
        stage.modules["classifier"].requires_grad_(False)
        stage.train_step(slide, 0, (0, "s"))
    for (name, p), q in zip(whole[0].modules["backbone"].named_parameters(),
                            streamed[0].modules["backbone"].parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **EXACT, msg=name)


def test_streamed_backward_counts_each_position_once():
    """Overlapping tiles' inputs sum their gradients; each output's gradient is applied once: autograd's result."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 5, stride=2, padding=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 3, 3, padding=1)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 37, 29, generator=gen, dtype=torch.float64)
    grad = torch.randn(1, 3, 19, 15, generator=gen, dtype=torch.float64)
    whole_x = x.clone().requires_grad_()
    conv(whole_x).backward(grad)
    expected = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    grad_in = torch.zeros_like(x)
    streamed_backward(conv, x, grad, 4, x.device, torch.no_grad, grad_in)  # any context: enable_grad wins inside
    for p, e in zip(conv.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, **EXACT)
    torch.testing.assert_close(grad_in, whole_x.grad, **EXACT)
    torch.testing.assert_close(stitched_forward(conv, x, 4, x.device), conv(x).detach(), **EXACT)
