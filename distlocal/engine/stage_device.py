"""
Where a stage actor computes: the device Ray's GPU ids give it, its share of a GPU shared with other stages, the
CUDA allocator settings that go with it, and the refusals that keep a GPU run from training on the CPU unnoticed.
"""

from __future__ import annotations

import os
import socket

import ray
import torch

from distlocal.config import Config

__all__ = ["StageDevice", "choose_device", "node_id"]


class StageDevice:
    """A stage actor's device (or the reason it has none) and its share of that GPU."""

    def __init__(self, device: torch.device | None, share: float = 1.0, problem: str = ""):
        self.device, self.share, self.problem = device, share, problem  # problem: raised by the actor's info()


def choose_device(cfg: Config, index: int) -> StageDevice:
    """
    The device of stage `index` in this actor process: cuda:0 when Ray gave it GPU ids (Ray sets
    CUDA_VISIBLE_DEVICES to them, so cuda:0 is ours), else the CPU; train.device=cpu runs on the CPU even when
    GPUs are reserved (explicit train.gpus_per_stage).
    """
    gpus = ray.get_gpu_ids()
    where = f"stage {index + 1} on node {socket.gethostname()} ({node_id()[:12]})"
    if not gpus and cfg.train.device.startswith("cuda"):
        # Without GPU ids CUDA is hidden from this process (or, worse, every GPU of the node is visible).
        return StageDevice(None, problem=(
            f"{where} was asked for train.device={cfg.train.device} but Ray gave it no GPU (train.gpus_per_stage="
            f"{cfg.train.gpus_per_stage:g}); give each stage GPUs (train.gpus_per_stage=-1, or a share > 0), or set "
            f"train.device=cpu"))
    if gpus and cfg.train.device != "cpu" and not torch.cuda.is_available():
        # Training on the CPU of a GPU node would be 50-100x slower and look like a hang: refuse instead.
        return StageDevice(None, problem=(
            f"{where} was given GPU ids {gpus} but cannot use CUDA: {_cuda_problem()} (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); install an NVIDIA driver that supports CUDA "
            f"{torch.version.cuda} on that node (check `nvidia-smi`), or set train.device=cpu"))
    if not gpus or cfg.train.device == "cpu":
        return StageDevice(torch.device("cpu"))
    device = torch.device("cuda:0")
    # Of the GPU: stages that share one each get a memory fraction, so an out-of-memory is their own.
    share = min(1.0, ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
    _configure_allocator(cfg.train.transport, share, device)
    return StageDevice(device, share)


def _cuda_problem() -> str:
    """Why this process cannot use CUDA, in torch's own words (its init error names the driver / build)."""
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError / AssertionError with the reason
        return str(exc).strip().splitlines()[0]
    return "torch.cuda.is_available() is False"


def _configure_allocator(transport: str, share: float, device: torch.device) -> None:
    """
    Before the first CUDA allocation: expandable segments, so slides of varying size do not fragment the cache
    into blocks no later slide fits (not with CUDA IPC, which train.transport=nccl may choose, and whose sharing
    of expandable segments is not checked yet); a memory fraction for a GPU shared with other stages.
    """
    if transport != "nccl" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device)


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()
