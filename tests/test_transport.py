"""Which transport each activation hop gets, from where the stages run (no Ray needed)."""

import pytest
import torch

from distlocal.engine.transport import activation_dtype, plan_hops, summary


def _info(stage: int, node: str = "n1", gpu: str | None = "0", cupy: bool = True) -> dict:
    return {"stage": stage, "node": node, "node_id": f"id-{node}", "gpu_ids": [gpu] if gpu else [],
            "device": "cuda:0" if gpu else "cpu", "cupy": cupy}


def test_stages_sharing_one_gpu_use_cuda_ipc_without_cupy():
    """K=4 at 0.25 of one GPU: every hop is CUDA IPC, which needs no cupy (NCCL refuses two ranks on one GPU)."""
    hops = plan_hops("nccl", [_info(s, cupy=False) for s in range(1, 5)])
    assert [h.transport for h in hops] == ["cuda_ipc"] * 3
    assert summary(hops) == "cuda_ipc"


def test_stages_on_different_gpus_use_nccl_and_shared_gpus_cuda_ipc():
    """K=4 on two GPUs of one node, two stages each: cuda_ipc inside a GPU, nccl across."""
    infos = [_info(1), _info(2), _info(3, gpu="1"), _info(4, gpu="1")]
    hops = plan_hops("nccl", infos)
    assert [h.transport for h in hops] == ["cuda_ipc", "nccl", "cuda_ipc"]
    assert summary(hops) == "cuda_ipc,nccl,cuda_ipc"


def test_nccl_without_cupy_falls_back_naming_the_node_and_the_extra():
    """A GPU-to-GPU hop on a node without cupy goes through the object store, and says how to install it."""
    hops = plan_hops("nccl", [_info(1, node="a"), _info(2, node="b", cupy=False)])
    assert hops[0].transport == "object_store"
    assert "needs cupy, which is not installed on node b" in hops[0].why
    assert "uv sync --extra gpu" in hops[0].why


def test_the_same_gpu_on_two_nodes_is_not_shared():
    """GPU 0 of node a and GPU 0 of node b are different GPUs: nccl, not cuda_ipc."""
    assert plan_hops("nccl", [_info(1, node="a"), _info(2, node="b")])[0].transport == "nccl"


def test_k16_on_8_gpus_keeps_nccl_between_gpus():
    """
    Two stages per GPU: cuda_ipc within a GPU, nccl between. Ray builds one two-process communicator per sending
    pair, so a GPU whose two stages each talk to another GPU never holds two ranks of one communicator.
    """
    infos = [_info(s, gpu=str((s - 1) // 2)) for s in range(1, 17)]
    hops = plan_hops("nccl", infos)
    assert [h.transport for h in hops] == ["cuda_ipc", "nccl"] * 7 + ["cuda_ipc"]
    assert not any(h.why for h in hops)


def test_a_stage_between_two_on_one_other_gpu_keeps_nccl():
    """Stages 1 and 3 on GPU 0, 2 on GPU 1: the pairs (1, 2) and (2, 3) are two communicators, each on two GPUs."""
    assert [h.transport for h in plan_hops("nccl", [_info(1), _info(2, gpu="1"), _info(3)])] == ["nccl", "nccl"]


@pytest.mark.parametrize(("asked", "gpu", "expected"), [("gloo", None, "gloo"), ("gloo", "0", "object_store"),
                                                        ("nccl", None, "object_store"),
                                                        ("object_store", "0", "object_store")])
def test_each_transport_only_where_it_carries_the_tensors(asked, gpu, expected):
    """A fallback, always with its cause, wherever the transport cannot carry the tensors (gloo: CPU, nccl: GPU)."""
    hops = plan_hops(asked, [_info(1, gpu=gpu), _info(2, gpu=gpu)])
    assert hops[0].transport == expected
    assert bool(hops[0].why) == (expected != asked)


@pytest.mark.parametrize(("asked", "precision", "dtype"), [
    ("auto", "fp32", torch.float32), ("auto", "bf16", torch.bfloat16), ("fp32", "bf16", torch.float32),
    ("bf16", "fp32", torch.bfloat16)])
def test_activation_dtype_auto_follows_the_precision_on_every_device(asked, precision, dtype):
    """train.activation_dtype=auto is train.precision's dtype, a CUDA stage's too (there is no device argument)."""
    assert activation_dtype(asked, precision) == dtype
