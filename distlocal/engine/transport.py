"""
How each activation hop (stage i -> stage i+1) travels under the Ray executor, decided from where the stages run.

- object_store: Ray's object store (always works; a GPU tensor is copied to host memory and back).
- cuda_ipc: both stages on the same GPU of one node; the receiver maps the sender's memory (no copy, no cupy).
- nccl: stages on different GPUs; needs cupy (`uv sync --extra gpu`). Ray builds one two-process communicator per
  sending pair, so two stages on one GPU may both send over NCCL (K = 16 on 8 GPUs: cuda_ipc, nccl, cuda_ipc, ...).
- gloo: CPU stages, over a torch gloo group.

`train.transport=nccl` asks for the GPU-direct pair (cuda_ipc within a GPU, nccl between GPUs). Every hop that
cannot have what was asked falls back to the object store, and the plan says why and what fixes it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

import torch

from distlocal.engine.faults import ClusterError

__all__ = [
    "Hop", "activation_dtype", "close_group", "handshake", "log_hops", "open_collective_group", "plan_hops", "summary",
]

HANDSHAKE_S = 120.0  # a first send that takes longer hangs: a cross-node NCCL bootstrap takes seconds
CLOSE_S = 30.0  # destroying a group whose member hangs in a transfer must not hang the driver
_NETWORK = ("check that the nodes reach each other on all ports and that NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME "
            "name an interface they share (NCCL_IB_DISABLE=1 if InfiniBand is not set up), or set "
            "train.transport=object_store")

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
            hops.append(Hop("cuda_ipc", ""))  # NCCL refuses a communicator with both ends on one GPU
        elif not (a["cupy"] and b["cupy"]):
            missing = a if not a["cupy"] else b
            hops.append(Hop("object_store", f"{pair} are on different GPUs and Ray's NCCL backend needs cupy, which "
                                            f"is not installed on node {missing['node']}; install it there with "
                                            f"`uv sync --extra gpu`"))
        else:
            hops.append(Hop("nccl", ""))
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


def handshake(actors: list, hops: list[Hop], timeout_s: float = HANDSHAKE_S) -> list[Hop]:
    """
    Send one small tensor over every nccl / gloo hop now; a hop whose send fails falls back to the object store
    with the reason. Ray builds a pair's communicator at its first send: without this, a bad interface, InfiniBand
    or firewall would show at the first slide, where Ray's transfer monitor kills both actors after 60 s and every
    recovery repeats it. A send that hangs ends the start with a ClusterError: its actors are stuck in it.
    """
    import ray
    from ray.exceptions import RayError

    checks = {}
    for i, hop in enumerate(hops):
        if hop.transport in ("nccl", "gloo"):
            probe = actors[i].probe_send.options(tensor_transport=hop.transport).remote()
            checks[i] = actors[i + 1].probe_receive.remote(probe)
    if not checks:
        return hops
    ready, _ = ray.wait(list(checks.values()), num_returns=len(checks), timeout=timeout_s)
    hung = [i for i, ref in checks.items() if ref not in ready]
    if hung:
        raise ClusterError(f"the first {hops[hung[0]].transport} send of stages "
                           f"{', '.join(f'{i + 1} -> {i + 2}' for i in hung)} did not arrive within {timeout_s:g} s; "
                           f"{_NETWORK}")
    out = list(hops)
    for i, ref in checks.items():
        try:
            ray.get(ref)
        except RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            out[i] = Hop("object_store", f"the first {hops[i].transport} send failed at start ({type(cause).__name__}: "
                                         f"{first}); {_NETWORK}")
    return out


def close_group(handle, timeout_s: float = CLOSE_S) -> None:
    """Destroy a collective group, giving up after `timeout_s` (Ray's own destroy waits on every member for ever)."""
    from ray.experimental.collective import destroy_collective_group

    failed: list[BaseException] = []

    def destroy():
        try:
            destroy_collective_group(handle)
        except Exception as exc:  # a member that died: its half of the group went with it
            failed.append(exc)

    thread = threading.Thread(target=destroy, daemon=True, name="destroy-collective-group")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or failed:
        log.warning("destroying the %s group: %s", handle.backend,
                    f"no answer within {timeout_s:g} s" if thread.is_alive() else failed[0])


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
