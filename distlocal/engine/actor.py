"""
The stage actor: one Stage in its own Ray worker process, usually on its own GPU.

Thin on purpose: it builds the same Stage as the local executor (`build_stage`), moves activations in and out
in the transport dtype, and keeps a trace of when it worked on which slide. No model logic lives here.
"""

from __future__ import annotations

import os
import socket
import time

import ray
import torch

from distlocal.config import config_from_dict
from distlocal.engine.checkpoint import stage_file
from distlocal.model import build_stage

__all__ = ["StageActor"]


class StageActor:
    """Wraps one Stage; methods are called by the RayExecutor only."""

    def __init__(self, cfg: dict, num_classes: int, index: int):
        self.cfg = config_from_dict(cfg)
        self.index = index
        torch.set_num_threads(max(1, int(self.cfg.train.cpus_per_stage)))
        gpus = ray.get_gpu_ids()
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor, so cuda:0 is ours.
        self.device = torch.device("cuda:0" if gpus and torch.cuda.is_available() else "cpu")
        self.stage = build_stage(self.cfg, num_classes, index, self.device)
        dtype = self.cfg.train.activation_dtype
        bf16 = dtype == "bf16" or (dtype == "auto" and self.device.type == "cuda")
        self.activation_dtype = torch.bfloat16 if bf16 else torch.float32
        self.trace: list[tuple[str, str, float, float]] = []  # (kind, slide_id, start, end), wall clock
        self.idle_since = time.time()
        self.results: dict[str, dict | torch.Tensor] = {}  # direct transport: results awaiting pop_result

    def info(self) -> dict:
        """Where this stage runs: reported in the run's log."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"stage": self.index + 1, "node": socket.gethostname(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.device), "device_name": name,
                "activation_dtype": str(self.activation_dtype).removeprefix("torch.")}

    def _begin(self) -> tuple[float, float]:
        start = time.time()
        return start, start - self.idle_since

    def _end(self, kind: str, slide_id: str, start: float) -> None:
        self.idle_since = time.time()
        self.trace.append((kind, slide_id, start, self.idle_since))

    def _send(self, out: torch.Tensor) -> torch.Tensor | None:
        if self.stage.is_last:
            return None  # nobody downstream: do not fill the object store with it
        return out.to(self.activation_dtype)

    @ray.method(num_returns=2)
    def train_step(self, x: torch.Tensor, y: int, slide_id: str):
        """(activation for the next stage, metrics) for one slide."""
        start, waited = self._begin()
        out, metrics = self.stage.train_step(x, y)
        sent = self._send(out)
        metrics.update(wait_s=waited, steps=float(self.stage.optim.steps))
        self._end("train", slide_id, start)
        return sent, metrics

    # Direct transport (train.transport nccl / gloo): Ray hands the returned tensor straight to the next actor
    # through a collective group instead of the object store. Such methods may return one value only, so the
    # metrics wait here for pop_result, which the driver calls right after.
    def _direct(self, method: str, x: torch.Tensor, *args) -> torch.Tensor | None:
        sent, result = getattr(self, method)(x, *args)
        self.results[args[-1]] = result
        return sent

    @ray.method(tensor_transport="nccl")
    def train_step_nccl(self, x, y, slide_id):
        return self._direct("train_step", x, y, slide_id)

    @ray.method(tensor_transport="gloo")
    def train_step_gloo(self, x, y, slide_id):
        return self._direct("train_step", x, y, slide_id)

    @ray.method(tensor_transport="nccl")
    def eval_step_nccl(self, x, slide_id):
        return self._direct("eval_step", x, slide_id)

    @ray.method(tensor_transport="gloo")
    def eval_step_gloo(self, x, slide_id):
        return self._direct("eval_step", x, slide_id)

    def pop_result(self, slide_id: str):
        return self.results.pop(slide_id)

    @ray.method(num_returns=2)
    def eval_step(self, x: torch.Tensor, slide_id: str):
        """(activation for the next stage, class probabilities) for one slide, forward only."""
        start, _ = self._begin()
        out, probs, _ = self.stage.eval_step(x)
        sent = self._send(out)
        self._end("eval", slide_id, start)
        return sent, probs

    def attend(self, x: torch.Tensor, slide_id: str):
        """(class probabilities, attention map) of this stage's classifier: H's attention for heatmaps."""
        start, _ = self._begin()
        _, probs, attention = self.stage.eval_step(x)
        self._end("eval", slide_id, start)
        return probs, attention

    def end_epoch(self, metric: float) -> None:
        self.stage.end_epoch(metric)

    def state_dict(self) -> dict:
        return self.stage.state_dict()

    def save(self, directory: str) -> str:
        """Write this stage's part of a checkpoint folder (a path every node can reach)."""
        path = stage_file(directory, self.index)
        torch.save(self.stage.state_dict(), path)
        return str(path)

    def load(self, directory: str) -> None:
        path = stage_file(directory, self.index)
        self.stage.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def stats(self) -> dict:
        return {"steps": self.stage.optim.steps, "rfr_clamped": getattr(self.stage, "rfr_clamped", 0)}

    def pop_trace(self) -> list[tuple[str, str, float, float]]:
        trace, self.trace = self.trace, []
        return trace

    def ping(self) -> int:
        return os.getpid()
