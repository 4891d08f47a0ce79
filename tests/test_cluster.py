"""The cluster path: a real `ray job submit` to a real Ray head, GPU sharing, and the files in cluster/."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.util.placement_group import remove_placement_group

from distlocal.config_load import load_config
from distlocal.engine.faults import ClusterError
from distlocal.engine.placement import place_stages, stage_resources
from distlocal.engine.ray_executor import RayExecutor
from distlocal.slides import write_synthetic_dataset
from tests.harness import end_process_group

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
BIN = Path(sys.executable).parent  # ray and python of this environment


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real Ray head on localhost (2 CPUs, token authentication), stopped afterwards whatever happens."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": ""}
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
               "--dashboard-host=127.0.0.1", f"--ray-client-server-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2", "--num-gpus=0",
               "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"]
    head = subprocess.Popen(command, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # its own process group: end_process_group ends all of it
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True,
                             check=False).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head's job server did not come up within 120 s"
            time.sleep(2)
        yield address, env
    finally:
        # --block: the head's process group holds every Ray process it started. Its graceful stop takes ~30 s on
        # 2 cores; nothing of it is kept, so 5 s, then SIGKILL.
        end_process_group(head, timeout_s=5)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_and_tracks(ray_head, tmp_path):
    """cluster/submit.sh sends a tiny K=2 training to the head; it succeeds, logs its placement and its MLflow run."""
    address, env = ray_head
    manifest = write_synthetic_dataset(tmp_path / "slides", slides=8, classes=2, size=(96, 96), seed=0)
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    job = subprocess.run(
        [str(CLUSTER / "submit.sh"), "train", "configs/synthetic.yaml", "--set", f"data.manifest={manifest}",
         "--set", f"run.dir={tmp_path / 'runs'}", "--set", "run.name=job", "--set", "train.executor=ray",
         "--set", "model.backbone=resnet18", "--set", "model.k=2", "--set", "model.split=balanced",
         "--set", "model.aux_kernels=[3,1]", "--set", "train.epochs=1", "--set", "model.rfr.patch_size=16"],
        env={**env, "RAY_ADDRESS": address, "RUNTIME_ENV": str(tmp_path / "runtime_env.yaml")},
        capture_output=True, text=True, timeout=600, check=False)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "placed 2 stages x {'CPU': 1.0} (strict_pack)" in log
    assert "stage 1 on " in log
    assert "stage 2 on " in log
    assert "activations stage 1 -> 2: object_store" in log
    run_id = json.loads((tmp_path / "runs" / "job" / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["executor"] == "ray"
    assert run.data.tags["transport"] == "object_store"
    assert "val/auroc" in run.data.metrics


@pytest.fixture(scope="module")
def fake_gpu_ray():
    """A real local Ray that advertises 2 GPUs (none exist: only the resource count is used here), for this module."""
    ray.shutdown()  # the shared Ray, if one runs: the next test that asks for local_ray starts it again
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    yield
    ray.shutdown()


def test_fewer_gpus_than_stages_share_them_with_a_warning(fake_gpu_ray, caplog):
    """K=4 on 2 GPUs: half a GPU each and a warning naming the GPUs K needs; an explicit share is checked."""
    assert stage_resources(load_config(None, ["train.device=cuda"]).train, 4) == (1.0, 0.5)
    assert "K=4 needs 4 GPUs for one stage each" in caplog.text
    assert stage_resources(load_config(None, ["train.device=cuda"]).train, 2) == (1.0, 1.0)
    assert stage_resources(load_config(None, ["train.device=cuda"]).train, 3)[1] == 0.5


def test_a_sixth_of_a_gpu_is_rounded_down_so_the_shares_pack(fake_gpu_ray):
    """Shares are asked at Ray's 1e-4 precision, rounded down: 12 stages at 1/6 of 2 GPUs ask 0.1666 and place."""
    cfg = load_config(None, ["train.device=cuda", "train.cpus_per_stage=0.5", "train.placement=pack",
                             "train.placement_timeout_s=15"]).train
    assert stage_resources(cfg, 12) == (0.5, 0.1666)
    cfg.gpus_per_stage = 1 / 6  # asked explicitly: the same rounding
    group, _, gpus = place_stages(cfg, 12)
    try:
        assert gpus == 0.1666
    finally:
        remove_placement_group(group)


def test_gpu_ids_without_cuda_fail_at_start_and_free_the_cluster(fake_gpu_ray, manifest, tmp_path):
    """Stages given GPU ids whose torch cannot use CUDA refuse to train on the CPU; the placement group goes."""
    cfg = load_config(None, [f"data.manifest={manifest}", f"run.dir={tmp_path}", "train.executor=ray",
                             "model.backbone=resnet18", "model.k=2", "model.split=balanced",
                             "train.placement_timeout_s=20"])
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the stages would use it")
    problem = (r"stage \d on node \S+ \(\w+\) was given GPU ids \[\d\] but cannot use CUDA: .+ \(torch .*\); "
               r"install an NVIDIA driver .*or set train.device=cpu")
    with pytest.raises(ClusterError, match=problem):
        RayExecutor(cfg, 2)
    deadline = time.monotonic() + 20
    while ray.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 2


def test_runtime_env_is_valid_for_ray():
    """runtime_env.yaml passes Ray's own validation and does not exclude distlocal's packages."""
    spec = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    ray.runtime_env.RuntimeEnv(**spec)
    assert {"MLFLOW_TRACKING_URI", "RAY_ENABLE_UV_RUN_RUNTIME_ENV"} <= set(spec["env_vars"])
    packages = {p.name for p in (ROOT / "distlocal").iterdir() if p.is_dir()}
    for pattern in spec["excludes"]:
        assert pattern.startswith(("/", "*")) or pattern not in packages, f"excludes {pattern!r} drops a package"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "onprem.yaml"])
def test_launcher_configs_match_rays_schema(name):
    """The cluster launcher configs validate against the schema `ray up` uses."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "launcher" / name).read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] in ("aws", "local")
    assert any("uv sync --frozen" in c for c in config["setup_commands"])


def test_kuberay_manifests_carry_the_required_keys():
    """The RayJob asks for GPUs on its workers and none on the head; MLflow serves where the jobs look for it."""
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert "distlocal.cli train" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {e["name"] for e in worker["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    docs = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "mlflow.yaml").read_text())}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    assert (docs["Service"]["metadata"]["name"], docs["Service"]["spec"]["ports"][0]["port"]) == ("mlflow", 5000)
    uri = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000"
    volume = docs["Deployment"]["spec"]["template"]["spec"]["volumes"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_kuberay_image_recipe_installs_into_rays_python_at_the_clusters_ray_version():
    """The Dockerfile the RayJob runs: the lock's ray is the image's and the RayJob's, installed without a .venv."""
    recipe = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    lock = (ROOT / "uv.lock").read_text()
    locked = lock.split('\nname = "ray"\nversion = "', 1)[1].split('"', 1)[0]
    assert f"ARG RAY_VERSION={locked}\n" in recipe
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == locked
    assert "uv pip install --system" in recipe
    assert "uv sync" not in recipe.replace("`uv sync`", "")  # named in a comment only
    assert "train.device=cuda" in job["spec"]["entrypoint"]  # never a silent CPU run while GPU pods start
