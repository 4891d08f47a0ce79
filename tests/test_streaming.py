"""
One Ray executor streaming slides, shared by the tests of its normal work and of a stage's error: starting one
costs 15-20 s on 2 cores, and none of these tests breaks it. It is started as a user on a CPU machine might: run.dir
given relative, train.transport=nccl, and stage 2 runs out of memory on one chosen slide.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.faults import ClusterError, StageOutOfMemory, out_of_memory_message
from distlocal.engine.ray_executor import RayExecutor
from distlocal.engine.remote import fetch
from distlocal.engine.timing import split_transfer
from tests.conftest import shared_ray
from tests.interrupt import OutOfMemoryOnArrival, failing_actor
from tests.tiny_run import tiny_run


class _Messages(logging.Handler):
    """The log lines of the executor's start (caplog is per test; the executor is per module)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def streaming(manifest, tmp_path_factory):
    """A K=2 executor (run.dir relative, nccl asked on CPU stages, stage 2 OOM on one test slide), for this module."""
    shared_ray()
    root = tmp_path_factory.mktemp("streaming")
    records = read_manifest(manifest)
    oom_slide = records.split("test")[0]
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    cfg = tiny_run(manifest, "relative/runs", "train.executor=ray", "model.k=2", "train.transport=nccl",
                   "train.max_inflight=3")
    messages, cwd = _Messages(), os.getcwd()
    logging.getLogger("distlocal").addHandler(messages)
    os.chdir(root)
    try:
        executor = RayExecutor(cfg, 2, actor_cls=failing_actor(1, oom, {oom_slide.slide_id}))
    finally:
        os.chdir(cwd)
        logging.getLogger("distlocal").removeHandler(messages)
    try:
        yield SimpleNamespace(executor=executor, cfg=cfg, root=root, log="\n".join(messages.lines),
                              train=records.split("train"), oom_slide=oom_slide)
    finally:
        executor.close()


def test_stages_work_on_different_slides_at_once(streaming):
    """With slides in flight, stage 1 trains on slide n+1 while stage 2 trains on slide n (actor traces)."""
    executor, records = streaming.executor, streaming.train
    executor.traces()  # only this test's work
    order = [slide_id for slide_id, _ in executor.train(records, SlideLoader(streaming.cfg.data, True, 0), 0)]
    first, second = executor.traces()
    assert order == [r.slide_id for r in records]  # results come back in slide order
    spans1 = {slide: (start, end) for _, slide, start, end in first}
    spans2 = {slide: (start, end) for _, slide, start, end in second}
    overlaps = [n for n in range(len(order) - 1)
                if spans1[order[n + 1]][0] < spans2[order[n]][1] and spans2[order[n]][0] < spans1[order[n + 1]][1]]
    assert overlaps, f"no overlap of stage 1 on slide n+1 with stage 2 on slide n: {spans1} {spans2}"


def test_out_of_memory_in_a_stage_names_the_stage_device_slide_and_fixes(streaming):
    """torch.OutOfMemoryError in stage 2 reaches the driver with where it happened, the input size and the knobs."""
    slide = streaming.oom_slide
    with pytest.raises(StageOutOfMemory, match=(
            rf"stage 2/2 ran out of memory on cpu \(cpu\) on \S+, slide {slide.slide_id}: its input "
            r"\(stage 1's activation\) is 1x\d+x\d+x\d+ .*Tried to allocate 20.00 GiB.*model.k \(now 2\).*"
            r"train.precision=bf16.*train.recompute_activations=true.*predict.max_tile_pixels")):
        list(streaming.executor.train([slide], SlideLoader(streaming.cfg.data, True, 0), 0))
    # The stage that failed on one slide still trains the next: the driver decides what the run does about it.
    assert len(list(streaming.executor.train(streaming.train[:1], SlideLoader(streaming.cfg.data, True, 0), 0))) == 1


def test_a_relative_run_dir_is_resolved_and_nccl_on_cpus_falls_back(streaming, monkeypatch):
    """
    run.dir=relative/runs is made absolute on the driver; each actor found the driver's marker there, which is gone.
    train.transport=nccl on CPU stages says why it cannot be and uses the object store; training still works.
    """
    executor, root = streaming.executor, streaming.root
    assert executor.transport is None
    assert "train.transport=nccl" in streaming.log
    assert len(list(executor.train(streaming.train[:2], SlideLoader(streaming.cfg.data, True, 0), 0))) == 2
    assert executor.run_dir == root / "relative" / "runs"
    assert list(executor.run_dir.iterdir()) == []  # the marker is removed once every stage has seen it
    monkeypatch.chdir(root)
    (root / "relative" / "runs" / "ckpt").mkdir()
    executor.save_stages(Path("relative/runs/ckpt"))  # written where the driver sees it, not in a worker's cwd
    assert sorted(p.name for p in (root / "relative" / "runs" / "ckpt").iterdir()) == ["stage1.pt", "stage2.pt"]


def test_validation_enters_the_pipeline_while_training_drains(streaming, manifest):
    """
    After evaluate_next, stage 1 evaluates the first validation slide while stage 2 still trains the last training
    slide; each stage evaluates after its own last step, so the probabilities equal those of evaluating afterwards.
    """
    executor, cfg = streaming.executor, streaming.cfg
    valid, loader = read_manifest(manifest).split("valid"), SlideLoader(cfg.data, False)
    executor.traces()  # only this test's work
    executor.evaluate_next(valid, loader)
    assert len(list(executor.train(streaming.train[:4], SlideLoader(cfg.data, True, 0), 0))) == 4
    overlapped = dict(executor.evaluate(valid, loader))
    first, second = executor.traces()
    last_training = max(end for kind, _, _, end in second if kind == "train")
    first_evaluation = min(start for kind, _, start, _ in first if kind == "eval")
    assert first_evaluation < last_training, "validation waited for the pipeline to drain"
    after = dict(executor.evaluate(valid, SlideLoader(cfg.data, False)))
    assert list(overlapped) == [r.slide_id for r in valid]
    for slide_id, probs in after.items():
        for ours, theirs in zip(overlapped[slide_id], probs, strict=True):
            assert torch.equal(ours, theirs), slide_id  # the same actors, the same arithmetic


def test_an_early_exit_stops_the_pipeline_at_that_stage(streaming, manifest):
    """evaluate(depth=1) (predict.classifier=A_1): A_1's probabilities as a full pass computes them; stage 2 idles."""
    executor, cfg = streaming.executor, streaming.cfg
    valid = read_manifest(manifest).split("valid")
    full = dict(executor.evaluate(valid, SlideLoader(cfg.data, False)))
    executor.traces()
    early = dict(executor.evaluate(valid, SlideLoader(cfg.data, False), depth=1))
    first, second = executor.traces()
    assert list(early) == [r.slide_id for r in valid]
    assert [kind for kind, *_ in first] == ["eval"] * len(valid)
    assert second == []
    for slide_id, probs in early.items():
        assert len(probs) == 1
        assert torch.equal(probs[0], full[slide_id][0]), slide_id
    # the heatmaps of an A_1 run: A_1's attention, from stage 1 alone
    [(slide_id, (probs, attention))] = list(executor.attention(valid[:1], SlideLoader(cfg.data, False), depth=1))
    assert torch.equal(probs, early[slide_id][0])
    assert attention.ndim == 2
    assert [kind for kind, *_ in executor.traces()[1]] == []


def test_out_of_memory_before_a_step_runs_names_the_stage_and_the_device(streaming):
    """An OOM while Ray deserializes a stage's input (outside its step) still names the stage, device and size."""
    stage2 = streaming.executor.actors.stages[1][0]
    x, _ = stage2.eval_step.remote(OutOfMemoryOnArrival("CUDA out of memory. Tried to allocate 6.00 GiB"), "s9")
    with pytest.raises(StageOutOfMemory, match=r"stage 2/2 on cpu \(cpu\) on \S+ ran out of memory receiving its "
                                               r"input for slide s9.*Tried to allocate 6.00 GiB.*model.k"):
        fetch(x, "slide s9")


def test_out_of_memory_on_a_shared_gpu_says_so():
    """A stage with half a GPU learns that its share, not the slide alone, is what ran out."""
    message = out_of_memory_message(1, 4, "cuda:0 (H100) on n1", "s1", (1, 64, 500, 400),
                                    torch.OutOfMemoryError("CUDA out of memory"), share=0.5)
    assert "stage 2/4 ran out of memory on cuda:0 (H100) on n1, slide s1" in message
    assert "0.5 of its GPU, shared with other stages" in message
    assert "train.gpus_per_stage" in message


def test_a_node_without_the_shared_run_dir_fails_to_load_naming_the_mount(streaming, tmp_path):
    """A (replacement) node that lacks the checkpoint folder says which mount it needs, not a bare FileNotFoundError."""
    with pytest.raises(ClusterError, match=r"stage \d on node \S+ \(\w+\) cannot read its checkpoint file "
                                           r"\S+/stage\d.pt .*must mount the shared storage of run.dir at /"):
        streaming.executor.load_stages(tmp_path / "not-mounted" / "checkpoints" / "last")


def test_a_stages_wait_is_split_into_starved_and_transfer_time(streaming):
    """Stage 2's idle time before a slide: its transfer part (serialization, copies) is no longer booked as waiting."""
    rows = [metrics for _, metrics in streaming.executor.train(streaming.train[:2],
                                                              SlideLoader(streaming.cfg.data, True, 0), 0)]
    raw = [dict(m) for m in rows[1]]
    split = split_transfer(rows[1])[1]
    assert 0.0 <= split["transfer_s"] <= raw[1]["wait_s"]
    assert split["wait_s"] + split["transfer_s"] == pytest.approx(raw[1]["wait_s"], abs=1e-9)
    assert raw[0]["sent_at"] <= raw[1]["started_at"]  # one machine, one clock: the activation left before it arrived
    assert split["transfer_s"] == pytest.approx(
        raw[1]["started_at"] - max(raw[0]["sent_at"], raw[1]["started_at"] - raw[1]["wait_s"]), abs=1e-9)
