"""
How each activation hop (stage i -> stage i+1) travels under the Ray executor, decided from where the stages run.

- object_store: Ray's object store (always works; a GPU tensor is copied to host memory and back).
- cuda_ipc: both stages on the same GPU of one node; the receiver maps the sender's memory (no copy, no cupy).
- nccl: stages on different GPUs; needs cupy (`uv sync --extra gpu`) and one NCCL rank per GPU.
- gloo: CPU stages, over a torch gloo group.

`train.transport=nccl` asks for the GPU-direct pair (cuda_ipc within a GPU, nccl between GPUs). Every hop that
cannot have what was asked falls back to the object store, and the plan says why and what fixes it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

__all__ = ["Hop", "activation_dtype", "log_hops", "open_collective_group", "plan_hops", "summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hop:
    transport: str  # object_store | cuda_ipc | nccl | gloo
    why: str  # the cause of a fallback and its fix; empty when the hop got what was asked


def activation_dtype(asked: str, precision: str) -> torch.dtype:
    """
    The dtype of the activations a stage sends (train.activation_dtype): auto follows train.precision, on every
    device, so an fp32 run is fp32 on the wire too (a bf16 hop would round what the local executor passes whole);
    a bf16 run sends what its autocast computed.
    """
    bf16 = asked == "bf16" or (asked == "auto" and precision == "bf16")
    return torch.bfloat16 if bf16 else torch.float32


def _gpu(info: dict) -> tuple[str, tuple[str, ...]]:
    return info.get("node_id", info["node"]), tuple(info["gpu_ids"])


def plan_hops(asked: str, infos: list[dict]) -> list[Hop]:
    """One Hop per pair of consecutive stages, from each stage actor's info() (device, node_id, gpu_ids, cupy)."""
    hops = []
    for a, b in itertools.pairwise(infos):
        pair = f"stages {a['stage']} -> {b['stage']}"
        on_gpu = a["device"].startswith("cuda") and b["device"].startswith("cuda")
        if asked == "object_store":
            hops.append(Hop("object_store", ""))
        elif asked == "gloo":
            hops.append(Hop("gloo", "") if not (a["device"].startswith("cuda") or b["device"].startswith("cuda"))
                        else Hop("object_store", f"{pair}: gloo carries CPU tensors, but they run on {a['device']} "
                                                 f"and {b['device']}; set train.transport=nccl for GPU stages"))
        elif not on_gpu:
            hops.append(Hop("object_store", f"train.transport=nccl needs every stage on a GPU, but {pair} run on "
                                            f"{a['device']} and {b['device']}; give the stages GPUs "
                                            f"(train.gpus_per_stage) or set train.transport=gloo for CPU stages"))
        elif _gpu(a) == _gpu(b):
            hops.append(Hop("cuda_ipc", ""))  # NCCL refuses two ranks on one GPU; CUDA IPC is the direct path here
        elif not (a["cupy"] and b["cupy"]):
            missing = a if not a["cupy"] else b
            hops.append(Hop("object_store", f"{pair} are on different GPUs and Ray's NCCL backend needs cupy, which "
                                            f"is not installed on node {missing['node']}; install it there with "
                                            f"`uv sync --extra gpu`"))
        else:
            hops.append(Hop("nccl", ""))
    # An actor takes one NCCL rank: two stages that share a GPU cannot both be ranks of the group.
    ranks = _nccl_ranks(hops)
    gpus = [_gpu(infos[i]) for i in ranks]
    if len(set(gpus)) < len(gpus):
        hops = [Hop("object_store", "NCCL takes one rank per GPU, but Ray put stages that send across GPUs on "
                                    f"the same GPU (GPU ids {[list(g[1]) for g in gpus]}, stages "
                                    f"{[i + 1 for i in ranks]}); one GPU per stage (train.gpus_per_stage=1) "
                                    "makes every hop nccl")
                if h.transport == "nccl" else h for h in hops]
    return hops


def _nccl_ranks(hops: list[Hop]) -> list[int]:
    """The stages (0-based) at either end of an nccl hop, in order: the members of the NCCL group."""
    return sorted({i + d for i, h in enumerate(hops) if h.transport == "nccl" for d in (0, 1)})


def open_collective_group(actors: list, hops: list[Hop]):
    """
    Create the collective group the hops need (nccl or gloo; cuda_ipc needs none) and return (handle, hops):
    the handle to destroy it with, or None; hops with the group's failure as their fallback cause.
    """
    backend = next((h.transport for h in hops if h.transport in ("nccl", "gloo")), None)
    if backend is None:
        return None, hops
    members = _nccl_ranks(hops) if backend == "nccl" else list(range(len(actors)))
    from ray.experimental.collective import create_collective_group

    try:
        handle = create_collective_group([actors[i] for i in members],
                                         backend="nccl" if backend == "nccl" else "torch_gloo")
    except Exception as exc:  # a firewall between nodes, an NCCL build without this GPU, ...
        cause = f"could not create the {backend} group ({type(exc).__name__}: {exc}); check that the nodes reach " \
                f"each other on all ports (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name the network interface)"
        return None, [Hop("object_store", cause) if h.transport == backend else h for h in hops]
    return handle, hops


def summary(hops: list[Hop]) -> str:
    """One value for a tag: the transport when every hop uses the same, else each hop's (e.g. cuda_ipc,nccl)."""
    names = [h.transport for h in hops] or ["none"]
    return names[0] if len(set(names)) == 1 else ",".join(names)


def log_hops(hops: list[Hop], asked: str) -> None:
    for i, hop in enumerate(hops):
        if hop.why:
            log.warning("activations stage %d -> %d: %s instead of train.transport=%s: %s", i + 1, i + 2,
                        hop.transport, asked, hop.why)
        else:
            log.info("activations stage %d -> %d: %s", i + 1, i + 2, hop.transport)
