"""AdamW with the paper's two parameter groups, gradient accumulation and the lr schedule (plateau or steps)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distlocal.config import TrainConfig

__all__ = ["Backward", "LocalOptimizer", "Reduce", "schedule_metric"]

# Sums the gradients (None: this replica has none for that parameter) and slide counts over a stage's replicas;
# returns the sums, None where no replica had a gradient. The engine supplies it (model/ knows no torch.distributed).
Reduce = Callable[[list[torch.Tensor | None], int], tuple[list[torch.Tensor | None], int]]
Backward = Callable[[torch.Tensor], None]  # accumulates the gradients of the (scaled) loss it is given


def schedule_metric(cfg: TrainConfig) -> str:
    """The validation metric that train.schedule=plateau watches: train.plateau_metric, else train.monitor."""
    return cfg.plateau_metric or cfg.monitor


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.schedule == "step":
        # The scheduler counts end_epoch calls: after epoch e (1-based) it has been stepped e times.
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_steps, gamma=cfg.plateau_factor)
    mode = "min" if schedule_metric(cfg) == "loss" else "max"
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.plateau_factor,
                                                      patience=cfg.plateau_patience)


class LocalOptimizer:
    """
    Owns one AdamW, its lr schedule (train.schedule), and the accumulation counter.

    `backward(loss)` adds loss / accumulate to the gradients and steps every `accumulate` calls:
    slides are batches of one, so accumulation stands in for the batch. Replicas of a stage instead call
    `add(loss)` per slide and `step(reduce)` when the driver says a window is complete: the loss is still divided
    by the whole window's `accumulate`, so the summed gradients of R replicas are one stage's.
    """

    def __init__(self, backbone: nn.Module, auxiliary: nn.Module, cfg: TrainConfig):
        def trainable(module: nn.Module) -> list[nn.Parameter]:
            return [p for p in module.parameters() if p.requires_grad]

        groups = [
            {"params": trainable(backbone), "lr": cfg.lr_backbone, "name": "backbone"},
            {"params": trainable(auxiliary), "lr": cfg.lr_aux, "name": "auxiliary"},
        ]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.scheduler = _scheduler(self.optimizer, cfg)
        self.plateau = cfg.schedule == "plateau"
        self.accumulate = cfg.accumulate
        self.accumulated = 0  # slides whose gradients wait in .grad
        self.steps = 0  # optimizer steps taken

    def backward(self, loss: torch.Tensor, backward: Backward = torch.Tensor.backward) -> bool:
        """Accumulate the gradients of `loss`; return True when this call took an optimizer step."""
        self.add(loss, backward)
        if self.accumulated < self.accumulate:
            return False
        return self.step()

    def add(self, loss: torch.Tensor, backward: Backward = torch.Tensor.backward) -> None:
        """
        Accumulate the gradients of one slide's `loss` without stepping. ``backward`` back-propagates the scaled
        loss: autograd's own, or a streamed stage's tile by tile (model/stream.py).
        """
        backward(loss / self.accumulate)
        self.accumulated += 1

    def add_empty(self, steps: bool = True) -> bool:
        """
        A window slot without gradients: a slide that stage 1 could not read after the driver had routed it into a
        replicated window (engine/unread.py), counted by every stage so their windows stay the driver's. With
        ``steps`` (a stage the driver does not step) the full window steps, as backward's does.
        """
        self.accumulated += 1
        return steps and self.accumulated >= self.accumulate and self.step()

    def _pool(self, reduce: Reduce) -> int:
        """Replace each gradient by its sum over the replicas; return the window's slide count over them all."""
        params = self.params()
        grads, count = reduce([p.grad for p in params], self.accumulated)
        for p, g in zip(params, grads, strict=True):
            # None where no replica had a gradient: AdamW then leaves that parameter alone (no weight decay, no
            # moment update), as one stage that never computed it would.
            p.grad = g
        return count

    def step(self, reduce: Reduce | None = None) -> bool:
        """Take the optimizer step of a window (summing it over the replicas first); False if it was empty."""
        count = self._pool(reduce) if reduce is not None else self.accumulated
        if count == 0:  # a window no replica trained a slide of: one stage would not have stepped either
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        self.steps += 1
        return True

    def pool(self, reduce: Reduce, keep: bool) -> None:
        """
        Gather an open window's gradients and count on the replica that `keep`s them (rank 0, which then holds
        one stage's state, the state it saves); the others start from nothing, so no slide is counted twice.
        """
        count = self._pool(reduce)
        if keep:
            self.accumulated = count
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.accumulated = 0

    def drop_pending(self) -> None:
        """Forget an open window (a replica other than rank 0 loading a checkpoint: rank 0 holds the window)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0

    def end_epoch(self, metric: float) -> None:
        """
        End an epoch: on a plateau schedule `metric` is the stage's validation schedule_metric (as measured: the
        scheduler knows a loss falls); a step schedule counts the epoch and ignores it.
        """
        if self.plateau:
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    @property
    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        # Gradients still accumulating are state too: without them a resumed run would differ.
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "accumulated": self.accumulated,
            "steps": self.steps,
            "pending_grads": [None if p.grad is None else p.grad.detach().clone() for p in self.params()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.accumulated, self.steps = state["accumulated"], state["steps"]
        for p, g in zip(self.params(), state["pending_grads"], strict=True):
            p.grad = None if g is None else g.to(p.device)
