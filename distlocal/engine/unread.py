"""
A slide that stage 1 could not read, part-way through a pass.

With model.stream on, stage 1 reads its slide region by region (data/regions.py): a cache tile or a slide tile that
is damaged inside shows only when stage 1's stem reads it, after the loader handed the slide over. The stem reads
every region before any gradient, optimizer state or random draw of the step (model/stage.py run_stem), so the slide
can leave the pass as a loader's bad slide does: data.on_error decides, the loader's `skip` reports it, and no stage
has learned from it.

Both executors do that. The local one catches the SlideError around the slide's stages and calls `loader.skip`. In
the Ray pipeline the error cannot travel as one: a task that raises makes every later stage's input an error, and
the driver would stop the run or enter recovery. Stage 1's actor returns `Unread` as its result instead and sends
`marker()` on as its activation; each later stage passes the marker on; `read_results` reports the slide to the
loader in the driver. With train.replicas the driver has already routed the slide into a window, so every stage
counts it as an empty slot there (LocalOptimizer.add_empty): the stages' windows stay the driver's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from distlocal.data import SlideLoader, SlideRecord
from distlocal.slides import SlideError

__all__ = ["Unread", "is_marker", "marker", "read_results"]


@dataclass(frozen=True)
class Unread:
    """A stage's result for a slide stage 1 could not read; stage 1's carries the error, later stages' None."""

    error: SlideError | None


def marker(device: torch.device) -> torch.Tensor:
    """
    The activation sent on for an unread slide: one element, so a direct transport (gloo, NCCL) sends it as any
    tensor, where an activation is 1 x C x h x w.
    """
    return torch.zeros(1, device=device)


def is_marker(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 1


def read_results(results: Iterable[tuple[str, list]], records: Iterable[SlideRecord],
                 loader: SlideLoader) -> Iterator[tuple[str, list]]:
    """``results`` without the unread slides, each reported by ``loader.skip`` (which raises under on_error=fail)."""
    by_id = {r.slide_id: r for r in records}
    for slide_id, outputs in results:
        if outputs and isinstance(outputs[0], Unread):
            loader.skip(by_id[slide_id], outputs[0].error)
            continue
        yield slide_id, outputs
