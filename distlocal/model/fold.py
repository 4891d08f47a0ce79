"""
train.fold_batchnorm: run each frozen BatchNorm folded into the convolution before it.

In eval mode BatchNorm is a fixed per-channel scale s = gamma / sqrt(var + eps) and shift t = beta - mean * s, so
bn(conv(x, W)) = conv(x, W * s) + t. Autograd would keep conv(x) and bn's input for backward; the folded convolution
keeps only x (which the previous layer keeps anyway) and rebuilds W * s from the parameters in backward. gamma and
beta still train, through s and t. Per residual block that is two maps kept instead of four.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["FoldedBasicBlock", "FoldedBottleneck", "fold_batchnorm", "folded_block"]


class _FoldedConv(torch.autograd.Function):
    """conv2d(x, weight * scale, shift) keeping (x, weight, scale) for backward: no copy of the folded weight."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, conv: nn.Conv2d):
        folded = weight * scale.view(-1, 1, 1, 1)
        out = F.conv2d(x, folded, shift, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.save_for_backward(x, weight, scale)
        ctx.conv, ctx.dtype = conv, out.dtype  # under autocast the convolution ran in bf16
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        conv, dtype = ctx.conv, ctx.dtype
        folded = (weight * scale.view(-1, 1, 1, 1)).to(dtype)
        grad_x, grad_folded, _ = torch.ops.aten.convolution_backward(
            grad.to(dtype), x.to(dtype), folded, [folded.shape[0]], list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0, 0], conv.groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2], False])
        # The shift's gradient summed in fp32 even when the convolution ran in bf16 (as BatchNorm's bias would be).
        wide = torch.promote_types(grad.dtype, torch.float32)
        grad_shift = grad.sum((0, 2, 3), dtype=wide) if ctx.needs_input_grad[3] else None
        grad_weight = grad_scale = None
        if grad_folded is not None:
            grad_folded = grad_folded.to(weight.dtype)
            grad_weight = grad_folded * scale.view(-1, 1, 1, 1) if ctx.needs_input_grad[1] else None
            grad_scale = (grad_folded * weight).sum((1, 2, 3)) if ctx.needs_input_grad[2] else None
        return (None if grad_x is None else grad_x.to(x.dtype), grad_weight, grad_scale,
                None if grad_shift is None else grad_shift.to(scale.dtype), None)


def _frozen(block: nn.Module) -> bool:
    return not any(m.training for m in block.modules() if isinstance(m, nn.BatchNorm2d))


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)) for a BatchNorm in eval mode (a bias-free convolution), as one folded convolution."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return _FoldedConv.apply(x, conv.weight, scale, shift, conv)  # without gradients, only its forward runs


def folded_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock or Bottleneck with every BatchNorm folded into its convolution."""
    convs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        convs.append((block.conv3, block.bn3))
    out = x
    for i, (conv, bn) in enumerate(convs):
        out = conv_bn(conv, bn, out)
        if i < len(convs) - 1:
            out = F.relu(out, inplace=True)  # relu keeps its output, which the next convolution keeps anyway
    identity = x if block.downsample is None else conv_bn(block.downsample[0], block.downsample[1], x)
    out += identity
    return F.relu(out, inplace=True)


class FoldedBasicBlock(BasicBlock):
    """A BasicBlock run by ``folded_block`` while its BatchNorms are in eval mode; same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return folded_block(self, x) if _frozen(self) else super().forward(x)


class FoldedBottleneck(Bottleneck):
    """A Bottleneck run by ``folded_block`` while its BatchNorms are in eval mode; same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return folded_block(self, x) if _frozen(self) else super().forward(x)


def fold_batchnorm(blocks: list[nn.Module]) -> None:
    """
    Run every block with its BatchNorms folded into the convolutions. The blocks keep their parameters, state dict
    and block hooks (hooks on the convolutions and BatchNorms inside no longer fire); only the forward changes, to
    the same function, since the backbone's BatchNorm is always frozen (a block in training mode runs unfolded).
    """
    folded = {BasicBlock: FoldedBasicBlock, Bottleneck: FoldedBottleneck}
    for block in blocks:
        block.__class__ = folded.get(type(block), type(block))
