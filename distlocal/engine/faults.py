"""Errors of a distributed run, importable without Ray (the trainer catches them whichever executor runs)."""

from __future__ import annotations

import re

__all__ = ["ClusterError", "GroupFailure", "InputFailed", "RunFailed", "StageFailure", "StageOutOfMemory",
           "is_out_of_memory", "out_of_memory_message", "unplaced_out_of_memory"]


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


_FIXES = ("To fit: raise model.k{now} so each stage holds fewer blocks, train.precision=bf16, "
          "train.recompute_activations=true, or crop / downscale the slides (data.magnification); for predict, a "
          "smaller predict.max_tile_pixels")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """
    torch.OutOfMemoryError, the CPU allocator's RuntimeError, or Ray's RaySystemError around a CUDA OOM in
    deserializing an argument; not Ray's own OutOfMemoryError (its memory monitor killed a worker: a lost actor).
    """
    if exc is None:
        return False
    torch_oom = type(exc).__module__.startswith("torch") and type(exc).__name__ == "OutOfMemoryError"
    return torch_oom or "CUDA out of memory" in str(exc) or "can't allocate memory" in str(exc)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _shared(share: float) -> str:
    if not 0 < share < 1:
        return ""
    return (f"This stage has {share:g} of its GPU, shared with other stages (each one's memory fraction): give "
            f"each stage a larger share (fewer stages per GPU: more GPUs, or train.gpus_per_stage). ")


def out_of_memory_message(index: int, k: int, where: str, slide_id: str, shape: tuple, exc: BaseException, *,
                          doing: str = "", share: float = 1.0, replica: str = "") -> str:
    """
    Which stage, where, on what input (or doing what), and the knobs that lower a stage's peak memory.

    >>> out_of_memory_message(0, 4, "cuda:0", "s1", (1, 3, 8000, 6000), RuntimeError("CUDA out of memory"))[:47]
    'stage 1/4 ran out of memory on cuda:0, slide s1'
    """
    head = f"stage {index + 1}/{k}{replica} ran out of memory on {where}"
    if shape:
        h, w = shape[-2:] if len(shape) >= 2 else (0, 0)
        what = "the slide" if index == 0 else f"stage {index}'s activation"
        head += f", slide {slide_id}: its input ({what}) is {'x'.join(map(str, shape))} ({h * w / 1e6:.1f} Mpx)"
    if doing:
        head += f" {doing}"
    return f"{head} [{_first_line(exc)}]. {_shared(share)}{_FIXES.format(now=f' (now {k})')}"


def unplaced_out_of_memory(exc: BaseException, task_error: BaseException, what: str) -> StageOutOfMemory | None:
    """
    An out-of-memory raised before a stage's own code ran (Ray deserializing its input onto the GPU, an NCCL
    receive buffer) as a StageOutOfMemory naming the stage by the actor's repr (stage, device, node), which Ray
    puts in the task's error `task_error`; None for any other error.
    """
    if not is_out_of_memory(exc) or isinstance(exc, StageOutOfMemory):
        return None
    # ray.get raises a copy of the task's error that drops actor_repr; its first line still ends "repr=...)".
    found = re.search(r"repr=(.+)\)\s*$", str(task_error).splitlines()[0] if str(task_error) else "")
    actor = getattr(task_error, "__dict__", {}).get("actor_repr") or (found.group(1) if found else "a stage")
    return StageOutOfMemory(f"{actor} ran out of memory receiving its input for {what} (Ray deserializing it, or "
                            f"an NCCL receive buffer) [{_first_line(exc)}]. {_FIXES.format(now='')}")
