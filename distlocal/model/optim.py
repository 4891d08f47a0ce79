"""AdamW with the paper's two parameter groups, gradient accumulation and lr on plateau."""

from __future__ import annotations

import torch
from torch import nn

from distlocal.config import TrainConfig

__all__ = ["LocalOptimizer"]


class LocalOptimizer:
    """
    Owns one AdamW, its ReduceLROnPlateau, and the accumulation counter.

    `backward(loss)` adds loss / accumulate to the gradients and steps every `accumulate` calls:
    slides are batches of one, so accumulation stands in for the batch.
    """

    def __init__(self, backbone: nn.Module, auxiliary: nn.Module, cfg: TrainConfig):
        def trainable(module: nn.Module) -> list[nn.Parameter]:
            return [p for p in module.parameters() if p.requires_grad]

        groups = [
            {"params": trainable(backbone), "lr": cfg.lr_backbone, "name": "backbone"},
            {"params": trainable(auxiliary), "lr": cfg.lr_aux, "name": "auxiliary"},
        ]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
        self.accumulate = cfg.accumulate
        self.accumulated = 0  # slides whose gradients wait in .grad
        self.steps = 0  # optimizer steps taken

    def backward(self, loss: torch.Tensor) -> bool:
        """Accumulate the gradients of `loss`; return True when this call took an optimizer step."""
        (loss / self.accumulate).backward()
        self.accumulated += 1
        if self.accumulated < self.accumulate:
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        self.steps += 1
        return True

    def end_epoch(self, metric: float) -> None:
        """Lower the learning rates when the validation metric stops improving."""
        self.scheduler.step(metric)

    @property
    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        # Gradients still accumulating are state too: without them a resumed run would differ.
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "accumulated": self.accumulated,
            "steps": self.steps,
            "pending_grads": [None if p.grad is None else p.grad.detach().clone() for p in self._params()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.accumulated, self.steps = state["accumulated"], state["steps"]
        for p, g in zip(self._params(), state["pending_grads"], strict=True):
            p.grad = None if g is None else g.to(p.device)
