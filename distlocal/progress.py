"""Progress bars that suit both a terminal and a log file (CI, `ray job logs`)."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress"]


def progress(*args, **kwargs) -> tqdm:
    """A tqdm bar with rate and ETA; off a terminal it redraws every 30 s instead of every slide."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(*args, **kwargs)
