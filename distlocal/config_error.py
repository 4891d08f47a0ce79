"""ConfigError on its own: config.py validates with classifiers.py, which raises it too; neither imports the other."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""
