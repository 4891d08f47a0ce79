"""Manifests, augmentation and slide loading for training and evaluation."""

from distlocal.data.loader import SkippedSlide, SlideLoader
from distlocal.data.manifest import Manifest, ManifestError, SlideRecord, read_manifest

__all__ = ["Manifest", "ManifestError", "SkippedSlide", "SlideLoader", "SlideRecord", "read_manifest"]
