"""Errors of a distributed run, importable without Ray (the trainer catches them whichever executor runs)."""

from __future__ import annotations

__all__ = ["ClusterError", "GroupFailure", "InputFailed", "RunFailed", "StageFailure", "StageOutOfMemory",
           "out_of_memory_message"]


class ClusterError(RuntimeError):
    """The cluster cannot run the stages as configured; the message says what was asked, what exists, the fix."""


class StageFailure(RuntimeError):
    """A stage actor died (process killed, node lost); the trainer restarts from the last checkpoint."""


class GroupFailure(RuntimeError):
    """A replica's all-reduce failed or timed out (a partner died): like a dead actor, the run recovers."""


class InputFailed(RuntimeError):
    """A stage's step did not run because an earlier stage failed on that slide: that stage's error is the news."""


class RunFailed(RuntimeError):
    """Stages kept failing beyond train.max_restarts; the last good checkpoint is intact."""


class StageOutOfMemory(RuntimeError):
    """A stage ran out of memory on a slide; not retried (the same slide would fail again), the message has fixes."""


def out_of_memory_message(index: int, k: int, where: str, slide_id: str, shape: tuple, exc: BaseException) -> str:
    """
    Which stage, where, on what input, and the knobs that lower a stage's peak memory.

    >>> out_of_memory_message(0, 4, "cuda:0", "s1", (1, 3, 8000, 6000), RuntimeError("CUDA out of memory"))[:47]
    'stage 1/4 ran out of memory on cuda:0, slide s1'
    """
    h, w = shape[-2:] if len(shape) >= 2 else (0, 0)
    what = "the slide" if index == 0 else f"stage {index}'s activation"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"stage {index + 1}/{k} ran out of memory on {where}, slide {slide_id}: its input ({what}) is "
            f"{'x'.join(map(str, shape))} ({h * w / 1e6:.1f} Mpx) [{first}]. To fit: raise model.k (now {k}) so "
            f"each stage holds fewer blocks, train.precision=bf16, train.recompute_activations=true, or crop / "
            f"downscale the slides (data.magnification); for predict, a smaller predict.max_tile_pixels")
