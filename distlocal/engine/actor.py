"""
The stage actor: one Stage in its own Ray worker process, usually on its own GPU.

Thin on purpose: it builds the same Stage as the local executor (`build_stage`), moves activations in and out
in the transport dtype, and keeps a trace of when it worked on which slide. No model logic lives here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import ray
import torch

from distlocal.config import stage_replicas
from distlocal.config_load import config_from_dict
from distlocal.engine.checkpoint import stage_file
from distlocal.engine.faults import (
    ClusterError,
    GroupFailure,
    InputFailed,
    StageFailure,
    StageOutOfMemory,
    is_out_of_memory,
    out_of_memory_message,
)
from distlocal.engine.recovery import restart_config
from distlocal.engine.replicas import ReplicaGroup
from distlocal.engine.stage_device import choose_device, node_id
from distlocal.engine.transport import activation_dtype
from distlocal.engine.unread import Unread, is_marker, marker
from distlocal.model import build_stage
from distlocal.slides import SlideError

__all__ = ["StageActor", "to_cpu"]


def to_cpu(tree):
    """A state dict with every tensor on the CPU: the driver that receives it may have no GPU at all."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


class StageActor:
    """Wraps one Stage; methods are called by the RayExecutor only."""

    def __init__(self, cfg: dict, num_classes: int, index: int, rank: int = 0, size: int = 1):
        # Restarted by Ray: built without its weights, which recover() loads from the checkpoint next; until then
        # it refuses work, so a restart before any checkpoint can never train or save random weights unnoticed.
        with warnings.catch_warnings():  # Ray's own property reads its deprecated actor_id: a warning in every run
            warnings.simplefilter("ignore", DeprecationWarning)
            self.unloaded = ray.get_runtime_context().was_current_actor_reconstructed
        if self.unloaded:
            cfg = restart_config(cfg)
        self.cfg = config_from_dict(cfg)
        self.index, self.rank, self.size = index, rank, size  # replica `rank` of `size` of stage `index`
        self.replica_group: ReplicaGroup | None = None
        self.store = None  # rank 0 hosts its group's TCPStore
        torch.set_num_threads(max(1, int(self.cfg.train.cpus_per_stage)))
        placed = choose_device(self.cfg, index)
        self.problem = placed.problem  # raised by info(): the driver's first call, so start-up fails with the reason
        if self.problem:
            return
        self.device, self.share = placed.device, placed.share
        cuda = self.device.type == "cuda"
        name = torch.cuda.get_device_name(self.device) if cuda else "cpu"
        replica = f" replica {rank + 1}/{size}" if size > 1 else ""
        self.where = f"{self.device} ({name}) on {socket.gethostname()}"
        self.name = f"stage {index + 1}/{self.cfg.model.k}{replica} on {self.where}"
        self.direct = False  # sending through a direct transport: the activation stays on the device
        self.stage = build_stage(self.cfg, num_classes, index, self.device)
        self.stage.driver_steps = size > 1  # replicas step when the driver says their window is complete
        self.replicated_run = max(stage_replicas(self.cfg.train, self.cfg.model.k)) > 1
        self.activation_dtype = activation_dtype(self.cfg.train.activation_dtype, self.cfg.train.precision)
        self.trace: list[tuple[str, str, float, float]] = []  # (kind, slide_id, start, end), wall clock
        self.idle_since = time.time()
        self.results: dict[str, dict | torch.Tensor | BaseException] = {}  # direct transport: awaiting pop_result

    def info(self) -> dict:
        """Where this stage runs: reported in the run's log."""
        if self.problem:
            raise ClusterError(self.problem)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"stage": self.index + 1, "replica": self.rank, "node": socket.gethostname(), "node_id": node_id(),
                "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.device), "device_name": name,
                "activation_dtype": str(self.activation_dtype).removeprefix("torch."),
                "cupy": importlib.util.find_spec("cupy") is not None}

    def sees(self, folder: str, marker: str, token: str) -> bool:
        """Whether `folder` here holds the marker the driver just wrote there (i.e. the storage is shared)."""
        path = Path(folder) / marker
        try:
            return path.read_text() == token
        except OSError:
            return False

    def _loaded(self) -> None:
        if self.unloaded:
            raise StageFailure(f"stage {self.index + 1} was restarted by Ray and has not loaded a checkpoint yet: its "
                               f"weights are not the run's")

    def _begin(self) -> tuple[float, float]:
        self._loaded()
        start = time.time()
        return start, start - self.idle_since

    def _end(self, kind: str, slide_id: str, start: float) -> None:
        self.idle_since = time.time()
        self.trace.append((kind, slide_id, start, self.idle_since))

    def __repr__(self) -> str:  # Ray names the actor by it in a task's error, e.g. one raised before a step ran
        return getattr(self, "name", f"stage {self.index + 1}")

    def _send(self, out: torch.Tensor) -> torch.Tensor | None:
        if self.stage.is_last:
            return None  # nobody downstream: do not fill the object store with it
        # Contiguous: Ray's NCCL send takes the pointer and the element count. Through the object store, a host
        # copy: Ray would pickle a CUDA tensor into one anyway, and unpickle it onto the receiver's cuda:0 before
        # its step runs (an OOM there would reach the driver unnamed); the receiver moves it in its step instead.
        out = out.to(self.activation_dtype).contiguous()
        return out if self.direct else out.cpu()

    def _out_of_memory(self, exc: BaseException, slide_id: str = "", shape: tuple = (),
                       doing: str = "") -> StageOutOfMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed step's blocks: keep the next slide from failing for them
        return StageOutOfMemory(out_of_memory_message(
            self.index, self.cfg.model.k, self.where, slide_id, shape, exc, doing=doing, share=self.share,
            replica=f" replica {self.rank + 1}/{self.size}" if self.size > 1 else ""))

    @contextmanager
    def _named(self, slide_id: str = "", x: torch.Tensor | None = None, doing: str = ""):
        """Any out-of-memory inside: a StageOutOfMemory naming this stage, its device, the input's size."""
        try:
            yield
        except Exception as exc:
            if not is_out_of_memory(exc) or isinstance(exc, StageOutOfMemory):
                raise
            raise self._out_of_memory(exc, slide_id, tuple(x.shape) if x is not None else (), doing) from None

    @ray.method(num_returns=2)
    def train_step(self, x: torch.Tensor, y: int, slide_id: str, epoch: int | None = None):
        """(activation for the next stage, metrics) for one slide; `epoch` seeds the slide's random draws."""
        start, waited = self._begin()
        if is_marker(x):  # stage 1 could not read this slide: pass it on (engine/unread.py)
            return self._unread(None, "train", slide_id, start)
        try:
            with self._named(slide_id, x):
                out, metrics = self.stage.train_step(x, y, None if epoch is None else (epoch, slide_id))
                sent = self._send(out)
        except SlideError as exc:  # read by region, a damaged tile shows only when stage 1 reads it
            return self._unread(exc, "train", slide_id, start)
        # started_at / sent_at: the driver splits the next stage's wait into starved and transfer (engine/timing.py).
        metrics.update(wait_s=waited, steps=float(self.stage.optim.steps), replica=float(self.rank),
                       started_at=start, sent_at=time.time())
        self._end("train", slide_id, start)
        return sent, metrics

    @ray.method(num_returns=2)
    def eval_step(self, x: torch.Tensor, slide_id: str, exits: bool = False):
        """
        (activation for the next stage, class probabilities) for one slide, forward only; ``exits``: the evaluation
        stops at this stage (predict.classifier=A_i), so no activation is sent on.
        """
        start, _ = self._begin()
        if is_marker(x):
            return self._unread(None, "eval", slide_id, start, exits)
        try:
            with self._named(slide_id, x):
                out, probs, _ = self.stage.eval_step(x)
                sent = None if exits else self._send(out)
        except SlideError as exc:
            return self._unread(exc, "eval", slide_id, start, exits)
        self._end("eval", slide_id, start)
        return sent, probs

    def _unread(self, error: SlideError | None, kind: str, slide_id: str, start: float, exits: bool = False):
        """(the marker for the next stage, Unread): a slide stage 1 could not read leaves the pass untrained."""
        if kind == "train" and self.replicated_run:  # the driver routed it into a window: an empty slot there
            self.stage.optim.add_empty(steps=not self.stage.driver_steps)
        self._end(kind, slide_id, start)
        return None if exits else self._send(marker(self.device)), Unread(error)

    # Direct transport (nccl, cuda_ipc, gloo): the driver calls these with .options(tensor_transport=...), and Ray
    # hands the returned tensor straight to the next actor instead of through the object store. Such methods
    # return one value only, so the metrics wait here for pop_result, which the driver calls right after; a step
    # that raises leaves its error there instead, so the driver sees that error and not a missing result.
    def _direct(self, step, slide_id: str, x: torch.Tensor, *args) -> torch.Tensor | None:
        self.direct = True
        try:
            sent, result = step(x, *args)
        except Exception as exc:
            self.results[slide_id] = exc
            raise
        finally:
            self.direct = False
        self.results[slide_id] = result
        return sent

    def train_direct(self, x, y, slide_id, epoch=None):
        return self._direct(self.train_step, slide_id, x, y, slide_id, epoch)

    def eval_direct(self, x, slide_id):
        return self._direct(self.eval_step, slide_id, x, slide_id)

    def probe_send(self) -> torch.Tensor:
        """The first tensor of a direct hop, sent when the stages connect (transport.handshake)."""
        return torch.arange(8, dtype=torch.float32, device=self.device)

    def probe_receive(self, x: torch.Tensor) -> float:
        return float(x.sum())

    def pop_result(self, slide_id: str):
        if slide_id not in self.results:  # the step never ran: its input (an earlier stage's output) failed
            raise InputFailed(f"stage {self.index + 1} has no result for slide {slide_id}: its step did not run "
                              f"because an earlier stage failed on that slide (see that stage's error)")
        result = self.results.pop(slide_id)
        if isinstance(result, BaseException):
            raise result
        return result

    def attend(self, x: torch.Tensor, slide_id: str):
        """(class probabilities, attention map) of this stage's classifier: H's attention for heatmaps."""
        start, _ = self._begin()
        if is_marker(x):
            return self._unread(None, "eval", slide_id, start, exits=True)[1]
        try:
            with self._named(slide_id, x):
                _, probs, attention = self.stage.eval_step(x)
        except SlideError as exc:
            return self._unread(exc, "eval", slide_id, start, exits=True)[1]
        self._end("eval", slide_id, start)
        return probs, attention

    def end_epoch(self, metric: float) -> None:
        self.stage.end_epoch(metric)

    # -- replicas (engine/replicas.py) ----------------------------------------------------------------------------

    def host_replica_group(self) -> tuple[str, int]:
        """Rank 0: host a fresh TCPStore for the group; returns its address for the other ranks."""
        host = ray.util.get_node_ip_address()
        self.store, port = ReplicaGroup.host_store(host, self.size, self.cfg.train.collective_timeout_s)
        return host, port

    def join_replica_group(self, address: tuple[str, int], generation: int) -> None:
        """Join the stage's group; every rank is called at once (the constructor waits for all of them)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.replica_group = ReplicaGroup(self.rank, self.size, tuple(address), generation, backend,
                                  self.cfg.train.collective_timeout_s, self.store if self.rank == 0 else None)

    def _reduce(self):
        return self.replica_group.reduce_params(self.stage.optim.params())

    def step(self, window: int) -> bool:
        """The optimizer step of `window`, its gradients summed over the replicas; True when it stepped."""
        start, _ = self._begin()
        try:
            with self._named(doing=f"in the optimizer step of window {window} (its all-reduce)"):
                stepped = self.stage.optim.step(self._reduce())
        except StageOutOfMemory:  # not a failed group: replaying the window would run out again
            raise
        except RuntimeError as exc:  # gloo / NCCL: a partner died, or did not come within the timeout
            raise GroupFailure(f"stage {self.index + 1} replica {self.rank}: all-reduce of window {window} "
                               f"failed: {exc}") from None
        self._end("step", str(window), start)
        return stepped

    def pool(self) -> None:
        """Gather an open window's gradients and counts on rank 0 (which then saves one stage's state)."""
        try:
            with self._named(doing="pooling the open window's gradients"):
                self.stage.optim.pool(self._reduce(), keep=self.rank == 0)
        except StageOutOfMemory:
            raise
        except RuntimeError as exc:
            raise GroupFailure(f"stage {self.index + 1} replica {self.rank}: pooling gradients failed: {exc}") from None

    def fingerprint(self) -> str:
        """A digest of what must be equal over replicas: parameters, frozen buffers and the optimizer's moments."""
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in self.stage.state_dict()["modules"].items():
            # RFR's own BatchNorm trains in train mode on this replica's slides only; its statistics are not used
            # in any forward pass, so they may differ.
            if name.startswith("rfr.") and ("running_" in name or "num_batches" in name):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for state in self.stage.optim.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def state_dict(self) -> dict:
        self._loaded()
        return to_cpu(self.stage.state_dict())

    def save(self, directory: str) -> str:
        """Write this stage's part of a checkpoint folder (a path every node can reach)."""
        self._loaded()
        path = stage_file(directory, self.index)
        torch.save(self.stage.state_dict(), path)
        return str(path)

    def load(self, directory: str) -> int:
        """Load this stage's file; returns the open window's slide count (rank 0 holds it, the others drop it)."""
        path = stage_file(directory, self.index)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:  # e.g. a replacement node that was not given the shared mount
            run_dir = Path(self.cfg.run.dir)
            raise ClusterError(
                f"stage {self.index + 1} on node {socket.gethostname()} ({node_id()[:12]}) cannot read its "
                f"checkpoint file {path} ({exc.strerror}); run.dir {run_dir} "
                f"{'exists but lacks it' if run_dir.is_dir() else 'does not exist'} on this node. Every node, "
                f"replacement nodes too, must mount the shared storage of run.dir at {run_dir}") from None
        self.stage.load_state_dict(state)
        self.unloaded = False
        filled = self.stage.optim.accumulated
        if self.rank > 0:
            self.stage.optim.drop_pending()
            self.stage.rfr_clamped = 0
        return filled

    def stats(self) -> dict:
        return {"steps": self.stage.optim.steps, "rfr_clamped": self.stage.rfr_clamped}

    def pop_trace(self) -> list[tuple[str, str, float, float]]:
        trace, self.trace = self.trace, []
        return trace

    def ping(self) -> int:
        return os.getpid()

    def leave_collective(self) -> None:
        """
        Drop torch's default process group, which Ray's gloo group creates once per process and then reuses:
        after a peer died, a new group on this survivor would wait for the dead rank for ever.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
