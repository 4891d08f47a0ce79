"""Shared fixtures: tiny configs and inputs so the method's tests run in seconds on a CPU."""

from __future__ import annotations

import os

# First: distlocal.engine sets RAY_ENABLE_UV_RUN_RUNTIME_ENV=0, which Ray reads once, when it is imported. Imported
# after ray, every Ray session of the run rebuilt this project's venv for its workers (`uv run` in a copy of the
# working directory: 18,000 files linked and byte-compiled, tens of CPU-seconds per session).
import distlocal.engine  # noqa: F401

# isort: split
import pytest
import ray
import torch

from distlocal.config_load import load_config
from distlocal.slides import write_synthetic_dataset
from tests.harness import become_subreaper, end_leftovers

# The files that take longest, slowest first (measured: 112 s down to 10 s on an idle 2-core Xeon). xdist's loadfile
# hands out files in collection order: a long file started last keeps one worker busy while the others are done,
# so these go first and the many short files fill in around them. A file not named here keeps its place after them.
SLOWEST_FILES = ("test_cohort_cluster.py", "test_ray_executor.py", "test_replicas.py", "test_demo.py",
                 "test_stream.py", "test_cluster.py", "test_sim_cluster.py", "test_trainer.py", "test_tracking.py",
                 "test_model.py", "test_sweep.py", "test_bench_memory.py", "test_predict.py", "test_loading.py",
                 "test_prepare.py", "test_streaming.py", "test_one_key.py", "test_bench_pipeline.py")


def pytest_collection_modifyitems(items):
    """Slowest files first (stable: a file's tests keep their order); see SLOWEST_FILES."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def make_cfg():
    """A validated Config with `--set`-style overrides on top of small-test defaults."""

    def make(*overrides: str):
        base = ["train.device=cpu", "train.accumulate=1", "model.rfr.patch_size=24", "train.lr_backbone=1e-3",
                "train.lr_aux=1e-3"]
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture
def slide():
    """A small normalised 'slide' tensor (1 x 3 x H x W)."""
    return torch.randn(1, 3, 160, 136, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Twelve small two-class synthetic slides (pyramidal TIFFs) with train/valid/test splits, once per module."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("slides"), slides=12, classes=2, size=(96, 96), seed=0)


# One local Ray for every test that only needs "a Ray": starting one costs 10-20 s on 2 cores. It carries a custom
# resource, so a test that finds another Ray (fake GPUs, several raylets, started by `no_shared_ray` users or by a
# module's own fixture) restarts the shared one instead of using the wrong one.
_SHARED = "distlocal_shared_test_ray"


def shared_ray() -> None:
    """Connect to the shared local Ray, starting it if another Ray (or none) is connected."""
    if not (ray.is_initialized() and ray.cluster_resources().get(_SHARED)):
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=6, num_gpus=0, resources={_SHARED: 1}, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)  # "local": new, even where another Ray runs here


@pytest.fixture
def local_ray():
    """A real single-node Ray with 6 logical CPUs and no GPU, shared by the tests that use it."""
    shared_ray()


@pytest.fixture
def actor_threads():
    """
    The local executor with the thread count of a stage actor (1): parity tests then compare the same arithmetic.
    With another count the convolutions sum in another order, and fp32 rounding, which differs from one CPU to the
    next, is all that the tolerance would be measuring.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_shared_ray():
    """For tests that start a Ray of their own: the shared one is shut down first (and restarted when needed)."""
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    yield
    ray.shutdown()


@pytest.fixture
def on_cluster(no_shared_ray, cluster):
    """The driver connected to the module's simulated cluster (its `cluster` fixture) for one test."""
    sim, nodes = cluster
    ray.init(address=sim.address, configure_logging=False, log_to_driver=False)
    return sim, nodes


@pytest.fixture(scope="session", autouse=True)
def _threads_per_worker():
    """
    Each pytest-xdist worker computes with its share of the cores. Two workers of two torch threads each on 2 cores
    wait on each other's OpenMP barriers: test_model's CPU-only tests ran 3x slower beside a Ray test.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)) // workers)))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind():
    """At the end of the run: no process the tests started may still run (see tests/harness.py)."""
    adopted = become_subreaper()
    yield
    ray.shutdown()
    left = end_leftovers()
    assert not left, (
        f"the test run left {len(left)} process(es) running (now killed); end each process a test starts with its "
        f"whole process group (tests/harness.py end_process_group):\n"
        + "\n".join(f"  {pid}: {cmd}" for pid, cmd in sorted(left.items()))
        + ("" if adopted else "\n(not a child subreaper: orphans of killed processes were not seen)"))
