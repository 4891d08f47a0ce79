"""
The ResNet backbone of the paper, cut into K gradient-isolated stages.

The stem (conv1, bn1, relu, maxpool) is frozen and the first conv uses stride 3, so the stem
downsamples 6x. The remaining residual blocks are grouped into K contiguous stages: the paper's
("reference") grouping for ResNet34 at K=4 and K=8, or equal block counts for any K.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from distlocal.config import ConfigError, ModelConfig
from distlocal.cut import stage_sizes  # the paper's units (reference) or equal counts (balanced)
from distlocal.model.fold import fold_batchnorm

__all__ = ["Backbone", "StageSpec", "build_backbone", "freeze_batchnorm", "run_blocks", "split_backbone"]

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    stem: nn.Sequential  # frozen: conv1, bn1, relu, maxpool
    blocks: list[nn.Module]  # every residual block, in order
    stem_stride: int
    stem_channels: int


@dataclass(frozen=True)
class StageSpec:
    """Which blocks a stage runs and the shapes around it (strides relative to the slide)."""

    index: int  # 0-based stage number
    blocks: tuple[int, ...]
    in_channels: int
    out_channels: int
    in_stride: int
    out_stride: int

    @property
    def factor(self) -> int:
        """Downsampling of the stage itself (u in the paper's RFR)."""
        return self.out_stride // self.in_stride


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep every BatchNorm in eval mode: slide batches of one never update running stats."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """
    The residual blocks in order. With ``recompute`` (train.recompute_activations), while gradients are on, each
    block keeps only its input for backward and runs again there; with BatchNorm frozen the rerun is the same
    computation, so gradients do not change.
    """
    if not (recompute and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def _load_weights(net: nn.Module, cfg: ModelConfig) -> None:
    if cfg.weights:
        path = Path(cfg.weights)
        if not path.is_file():
            raise ConfigError(f"model.weights={path} does not exist; give the path of a backbone state dict")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ConfigError(
                f"model.weights={path} does not fit {cfg.backbone}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; give a torchvision {cfg.backbone} state dict"
            )
        log.info("loaded backbone weights from %s", path)
    elif cfg.pretrained == "imagenet":
        enum = torchvision.models.get_model_weights(cfg.backbone).IMAGENET1K_V1
        try:
            net.load_state_dict(enum.get_state_dict(progress=True))
        except Exception as exc:
            raise ConfigError(
                f"could not get ImageNet weights for {cfg.backbone} ({exc}); without network access, "
                f"download {enum.url} elsewhere and set model.weights=PATH, or set model.pretrained=none"
            ) from None


def _scale_residual_branches(blocks: list[nn.Module]) -> None:
    """
    Random init only: start each residual branch's last BatchNorm gain at 1/sqrt(blocks) instead of 1.

    BatchNorm stays frozen at unit statistics here, so it never rescales activations. With gain 1 every block adds
    its branch's full variance and a random ResNet34's activations grow ~6x per stage (RMS ~100 after the last).
    With gain 0 (torchvision's zero_init_residual) every branch starts dead and, at the small learning rates of
    local training, stays nearly dead for a short run: each deep position then sees only the frozen stem's
    13 x 13 px window (1 position in 64 at the last stage), and sparse structures never reach the head.
    """
    gain = 1.0 / math.sqrt(len(blocks))
    for block in blocks:
        nn.init.constant_((block.bn3 if hasattr(block, "bn3") else block.bn2).weight, gain)


def build_backbone(cfg: ModelConfig, fold: bool = False) -> Backbone:
    """Build the torchvision ResNet with the paper's changes and the requested weights (``fold``: fold_batchnorm)."""
    net = torchvision.models.get_model(cfg.backbone, weights=None)
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    if cfg.pretrained == "none" and not cfg.weights:
        _scale_residual_branches(blocks)
    _load_weights(net, cfg)
    net.conv1.stride = (cfg.first_conv_stride, cfg.first_conv_stride)
    if fold:
        fold_batchnorm(blocks)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stem.requires_grad_(False)
    stem.eval()
    return Backbone(stem, blocks, cfg.first_conv_stride * 2, net.conv1.out_channels)


def _block_stride(block: nn.Module) -> int:
    return block.downsample[0].stride[0] if block.downsample is not None else 1


def _block_channels(block: nn.Module) -> int:
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def _groups(n_blocks: int, k: int, split: str, sizes: list[int] | None) -> list[list[int]]:
    """Contiguous block indices per stage: `sizes` when given (model.blocks_per_stage), else the split's cut."""
    sizes = sizes or stage_sizes(n_blocks, k, split)
    starts = [sum(sizes[:i]) for i in range(k)]
    return [list(range(s, s + n)) for s, n in zip(starts, sizes, strict=True)]


def split_backbone(backbone: Backbone, k: int, split: str, sizes: list[int] | None = None) -> list[StageSpec]:
    """Group the residual blocks into K contiguous stages (`sizes` blocks each when given) and describe each one."""
    n = len(backbone.blocks)
    if not 1 <= k <= n:
        raise ConfigError(f"model.k={k} must be between 1 and the backbone's {n} residual blocks")
    if split == "auto" and not sizes:
        raise ConfigError("model.split=auto needs the profiled cut in model.blocks_per_stage; the trainer fills it "
                          "in (distlocal train), or set model.blocks_per_stage yourself")
    groups = _groups(n, k, split, sizes)
    if any(not g for g in groups):
        raise ConfigError(f"model.split={split} with K={k} would give empty stages; lower model.k")
    specs, channels, stride = [], backbone.stem_channels, backbone.stem_stride
    for i, group in enumerate(groups):
        out_stride = stride
        for b in group:
            out_stride *= _block_stride(backbone.blocks[b])
        out_channels = _block_channels(backbone.blocks[group[-1]])
        specs.append(StageSpec(i, tuple(group), channels, out_channels, stride, out_stride))
        channels, stride = out_channels, out_stride
    return specs
