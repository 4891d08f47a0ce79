"""Build the K stages (or the end-to-end baseline) from a config, deterministically from its seed."""

from __future__ import annotations

import torch

from distlocal.config import Config, ConfigError
from distlocal.model.backbone import Backbone, StageSpec, build_backbone, split_backbone
from distlocal.model.budget import plan_streaming
from distlocal.model.e2e import EndToEnd, WholeSlideNet
from distlocal.model.interface import StageInterface
from distlocal.model.mil import AuxClassifier, classifier_kernel
from distlocal.model.rfr import FeatureReconstruction
from distlocal.model.stage import Stage

__all__ = ["build_stages", "build_stage", "resolve_device", "stage_seed"]


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit CUDA device on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but this machine has no CUDA device; set train.device=cpu")
    return torch.device(name)


def stage_seed(seed: int, index: int) -> int:
    """Seed of stage `index`'s own modules and generator, independent of the other stages."""
    return seed * 1009 + 17 * (index + 1)


def stage_kernel(cfg: Config, stem_stride: int, spec: StageSpec) -> int:
    """The kernel (= stride) of the strided conv that opens stage ``spec``'s classifier, A_i or H."""
    per_stage = cfg.model.aux_kernels  # an older config's kernel per stage, if it has one
    return per_stage[spec.index] if per_stage else \
        classifier_kernel(spec.out_stride // stem_stride, cfg.model.classifier_kernels)


def _aux_models(cfg: Config, backbone: Backbone, spec: StageSpec, num_classes: int, is_last: bool):
    torch.manual_seed(stage_seed(cfg.train.seed, spec.index))
    kernel = stage_kernel(cfg, backbone.stem_stride, spec)
    if is_last:
        return AuxClassifier.head(spec.out_channels, num_classes, kernel), None
    classifier = AuxClassifier.auxiliary(spec.out_channels, num_classes, kernel)
    rfr = None
    if cfg.model.rfr.enabled:
        # Every stage's patch covers the same slide area: 128 px on the stem's 1/6 map, 64 at 1/12, ...
        patch = max(1, cfg.model.rfr.patch_size * backbone.stem_stride // spec.out_stride)
        rfr = FeatureReconstruction(spec.in_channels, spec.out_channels, spec.factor, patch, cfg.model.rfr.patches)
    return classifier, rfr


def _backbone(cfg: Config) -> tuple[Backbone, list[StageSpec]]:
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model, cfg.train.fold_batchnorm)
    return backbone, split_backbone(backbone, cfg.model.k, cfg.model.split, cfg.model.blocks_per_stage)


def _make(cfg: Config, backbone: Backbone, specs: list[StageSpec], index: int, num_classes: int, device):
    spec = specs[index]
    is_last = index == len(specs) - 1
    classifier, rfr = _aux_models(cfg, backbone, spec, num_classes, is_last)
    if cfg.model.mode == "e2e":
        stage = EndToEnd(spec, WholeSlideNet(backbone, classifier), cfg, device, stage_seed(cfg.train.seed, 0))
    else:
        blocks = [backbone.blocks[b] for b in spec.blocks]
        stem = backbone.stem if index == 0 else None
        stage = Stage(spec, blocks, classifier, rfr, stem, cfg, device, stage_seed(cfg.train.seed, index), is_last)
    # model.stream: as given, or (auto) from a probe of this stage on its own device against train.memory_gb
    stage.streaming = plan_streaming(stage, cfg)
    return stage


def build_stages(cfg: Config, num_classes: int, device: torch.device | str = "cpu") -> list[StageInterface]:
    """All stages on one device (local executor); a single EndToEnd when model.mode is e2e."""
    backbone, specs = _backbone(cfg)
    return [_make(cfg, backbone, specs, i, num_classes, device) for i in range(len(specs))]


def build_stage(cfg: Config, num_classes: int, index: int, device: torch.device | str = "cpu") -> Stage:
    """Only stage `index`, initialised exactly as build_stages would (for one Ray actor per stage)."""
    backbone, specs = _backbone(cfg)
    return _make(cfg, backbone, specs, index, num_classes, device)
