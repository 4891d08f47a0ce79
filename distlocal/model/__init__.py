"""The paper's model in plain PyTorch: backbone split, MIL classifiers, RFR, and the Stage."""

from distlocal.model.backbone import StageSpec, build_backbone, split_backbone
from distlocal.model.build import build_stage, build_stages, resolve_device
from distlocal.model.e2e import EndToEnd
from distlocal.model.interface import StageInterface
from distlocal.model.mil import AuxClassifier, GatedAttentionPool
from distlocal.model.rfr import FeatureReconstruction
from distlocal.model.stage import Stage

__all__ = [
    "AuxClassifier", "EndToEnd", "FeatureReconstruction", "GatedAttentionPool", "Stage", "StageInterface", "StageSpec",
    "build_backbone", "build_stage", "build_stages", "resolve_device", "split_backbone",
]
