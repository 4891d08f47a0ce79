"""The errors that mean "fix your input" (shown as one line) rather than "bug" (shown with a traceback)."""

from distlocal.config import ConfigError
from distlocal.data.manifest import ManifestError
from distlocal.engine.checkpoint import CheckpointError
from distlocal.slides import SlideError

USER_ERRORS = (ConfigError, ManifestError, CheckpointError, SlideError)

__all__ = ["USER_ERRORS"]
