"""
The phase hand-over: an evaluation that enters the pipeline while the training before it drains.

`evaluate_next` returns a NextPass; the training pass under way lets its slides in, one as each training slide
leaves (engine/streaming.py); `evaluate` with the same slides and loader consumes it and continues where it is.
Every actor runs its calls in order, so each stage evaluates after its own last training step, as it would after
a full drain: the results are those of evaluating afterwards.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from distlocal.data import SlideLoader, SlideRecord

__all__ = ["NextPass"]


class NextPass:
    """An evaluation asked to follow the training under way (evaluate_next's handle)."""

    def __init__(self, records: list[SlideRecord], loader: SlideLoader):
        self.records, self.loader = list(records), loader
        self.slides: Iterator | None = None  # (record, tensor ref) still to enter; None until the pass has entered
        self.inflight: deque = deque()  # (slide_id, refs of each stage's result) entered and not yet fetched
        self.entered_count = 0

    @property
    def entered(self) -> bool:
        """Whether its slides have begun to enter (the training before it submitted its last slide)."""
        return self.slides is not None

    def serves(self, records: list[SlideRecord], loader: SlideLoader, full_depth: bool) -> bool:
        """Whether evaluate(records, loader) is this pass: the same slides, the same loader, every stage."""
        return self.entered and full_depth and loader is self.loader and \
            [r.slide_id for r in records] == [r.slide_id for r in self.records]
