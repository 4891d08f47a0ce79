"""The errors that mean "fix your input" (shown as one line) rather than "bug" (shown with a traceback)."""

from distlocal.config import ConfigError
from distlocal.data.manifest import ManifestError
from distlocal.engine.checkpoint import CheckpointError
from distlocal.engine.faults import ClusterError, RunFailed
from distlocal.slides import SlideError

USER_ERRORS = (ConfigError, ManifestError, CheckpointError, SlideError, ClusterError, RunFailed)

__all__ = ["USER_ERRORS"]
