"""
The GPU check behind tools/gpu_check.sh: each step runs in its own process with a time limit, so an
out-of-memory or a hang in one is recorded and the next still runs; the report is written after every step.

    python tools/gpu_check.py --out DIR [--only "bench memory,out of memory"] [--budget-s 300]
    python tools/gpu_check.py --probe oom     # one step: a real CUDA OOM inside a stage actor, as the driver sees it
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

PY = sys.executable
TAIL = 4000  # characters of each step's output kept in the report
MARK = "GPU_CHECK_ENVIRONMENT "  # the environment probe's line: found among any warnings the driver prints
MODULES = ("ray", "mlflow", "torchvision", "pytest", "openslide")  # what the steps import besides torch
# All steps together: one 10-minute call holds the check twice over (a rerun after a fix needs no new machine).
BUDGET_S = 300.0
MIN_STEP_S = 20  # a step given less time than this by the budget is skipped, not started to time out


@dataclass
class Step:
    name: str
    needs_cuda: bool
    timeout_s: int
    command: list[str]
    what: str
    needs: tuple[str, ...] = ()  # modules the step imports: skipped, naming them, where one is missing
    status: str = "not run"  # passed | failed | timed out | skipped: ...
    seconds: float = 0.0
    output: str = field(default="", repr=False)


def steps(out: Path) -> list[Step]:
    """The default steps, most telling first; their limits add up to 425 s, the budget (300 s) caps the total."""
    bench = [PY, "-m", "distlocal.cli", "bench"]
    core = ("ray", "mlflow", "torchvision")
    return [
        Step("environment", False, 45, [PY, __file__, "--probe", "environment"],
             "CUDA, driver, GPU, torch / Ray / MLflow / cupy versions"),
        # -o addopts=: the project's two xdist workers need pytest-xdist, which the GPU image may not have.
        Step("pytest -m gpu", True, 120, [PY, "-m", "pytest", "-o", "addopts=", "-m", "gpu", "-q", "-p",
                                          "no:cacheprovider", "-ra", "tests/test_gpu.py"],
             "local K=4 bf16 on 5 Mpx (tiled stem on the device, folded BN, recompute); Ray K=4 at 0.25 GPU: "
             "cuda_ipc hops asserted, equal to the local executor (fp32, TF32 off); a stage killed and recovered; "
             "predict whole vs tiled", (*core, "pytest")),
        Step("out of memory", True, 45, [PY, __file__, "--probe", "oom"],
             "a real CUDA OOM in stage 2 of a Ray run: the message the driver prints", core),
        Step("bench memory", True, 35, [*bench, "memory", "--device", "cuda", "--sizes", "2048x2048",
                                        "--out", str(out / "bench_memory")], "one size, E2E / K=4 / K=8", core),
        Step("bench memory --stream", True, 45, [*bench, "memory", "--stream", "--stream-methods", "k4", "--device",
                                                 "cuda", "--sizes", "768x1536,3072x6144", "--stream-tile", "1024",
                                                 "--out", str(out / "bench_memory_stream")],
             "streamed K=4 stages at two sizes (16x the pixels): CUDA peaks, the paper's slides computed", core),
        Step("stream step 5X", True, 60, [*bench, "memory", "--stream", "--step", "23849x10257", "--device", "cuda",
                                          "--stream-tile", "4096", "--out", str(out / "stream_step_5x")],
             "one streamed K=4 bf16 step of the paper's largest slide at 5X, read by region", core),
        Step("bench inference", True, 30, [*bench, "inference", "--mode", "memory", "--sizes", "2048x2048",
                                           "--repeats", "1", "--out", str(out / "bench_inference")],
             "whole slide against patches, in memory", core),
        Step("bench pipeline", True, 45, [*bench, "pipeline", "--slides", "8", "--size", "1024", "1024", "--set",
                                          "train.device=cuda", "--out", str(out / "bench_pipeline")],
             "Ray K=2 sharing the GPU against the local executor", core),
    ]


# Asked for by name only (--only): minutes of painting 20X slide files on the CPU, and OpenSlide (dev group); the
# 20X step holds ~30 GB of maps in host memory and takes minutes.
OPTIONAL = {"stream step 20X": lambda out: Step(
    "stream step 20X", True, 540,
    [PY, "-m", "distlocal.cli", "bench", "memory", "--stream", "--step", "95396x41028", "--device", "cuda",
     "--stream-tile", "4096", "--out", str(out / "stream_step_20x")],
    "one streamed K=4 bf16 step of the paper's largest slide at 20X (3.9 Gpx), read by region", ("torchvision",)),
    "bench inference deployed": lambda out: Step(
    "bench inference deployed", True, 480,
    [PY, "-m", "distlocal.cli", "bench", "inference", "--sizes", "2048x2048,4096x3072,8698x7496",
     "--out", str(out / "bench_inference_deployed")],
    "from the slide file to the prediction: CLAM reading tiles through OpenSlide against distlocal predict",
    ("ray", "mlflow", "torchvision", "openslide"))}


def _environment() -> None:
    info = {"python": platform.python_version(), "host": platform.node(), "python_path": sys.executable}
    try:
        import torch
    except ImportError as exc:  # still a report: what is missing and where
        info.update(torch=None, torch_cuda=None, cuda_available=False, problem=f"no torch in {sys.executable}: {exc}")
        print(MARK + json.dumps(info))
        return
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("ray", "mlflow", "mlflow-skinny", "cupy-cuda13x", "cupy-cuda12x", "pytest", "torchvision",
                 "openslide-python", "openslide-bin"):
        try:  # the installed version, without importing (mlflow alone takes seconds)
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    info["cupy"] = info["cupy-cuda13x"] or info["cupy-cuda12x"]
    info["installed"] = [name for name in MODULES if importlib.util.find_spec(name) is not None]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"not available ({exc})"
    print(MARK + json.dumps(info))


def _oom() -> None:
    """Stage 2 asks the allocator for far more than the GPU has, inside its step: a real torch.OutOfMemoryError."""
    import tempfile

    import ray
    import torch

    from distlocal.config_load import load_config
    from distlocal.data import SlideLoader, read_manifest
    from distlocal.engine.actor import StageActor
    from distlocal.engine.faults import StageOutOfMemory
    from distlocal.engine.ray_executor import RayExecutor
    from distlocal.slides import write_synthetic_dataset

    class Greedy(StageActor):
        def __init__(self, cfg, num_classes, index, *replica):  # replica: (rank, size) of a replicated stage
            super().__init__(cfg, num_classes, index, *replica)
            if index == 1:
                step = self.stage.train_step

                def greedy(x, y, slide=None):
                    torch.empty(2**40, device=self.device)  # 4 TiB of fp32
                    return step(x, y, slide)

                self.stage.train_step = greedy

    tmp = Path(tempfile.mkdtemp())
    manifest = write_synthetic_dataset(tmp / "slides", slides=6, classes=2, size=(256, 256), seed=0)
    cfg = load_config(None, [f"data.manifest={manifest}", f"run.dir={tmp / 'runs'}", "train.executor=ray",
                             "train.device=cuda", "model.backbone=resnet18", "model.k=2", "model.split=balanced",
                             "train.gpus_per_stage=0.5", "tracking.enabled=false"])
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    executor = RayExecutor(cfg, 2, actor_cls=Greedy)
    try:
        list(executor.train(read_manifest(manifest).split("train")[:1], SlideLoader(cfg.data, True, 0), 0))
    except StageOutOfMemory as exc:
        print(f"the driver got StageOutOfMemory: {exc}")
        return
    finally:
        executor.close()
        ray.shutdown()
    raise SystemExit("no out-of-memory error reached the driver")


def _run(step: Step, env: dict, left_s: float) -> str:
    """Run `step` within its limit and the budget left; returns its whole stdout (the report keeps a tail)."""
    missing = [name for name in step.needs if name not in env.get("installed", [])]
    if step.needs_cuda and not env.get("cuda_available"):
        step.status = "skipped: no CUDA"
    elif missing:
        step.status = f"skipped: needs {', '.join(missing)} (carry them in: see tools/gpu_check.sh)"
    elif left_s < MIN_STEP_S:
        step.status = "skipped: the time budget (--budget-s) is spent"
    if step.status.startswith("skipped"):
        return ""
    timeout = int(min(step.timeout_s, left_s))
    start = time.monotonic()
    stdout = ""
    try:
        done = subprocess.run(step.command, capture_output=True, text=True, timeout=timeout, check=False,
                              start_new_session=True)
        stdout = done.stdout
        step.output = (done.stdout + done.stderr)[-TAIL:]
        step.status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as exc:
        step.output = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))
        step.output = step.output[-TAIL:]
        step.status = f"timed out after {timeout} s"
    except OSError as exc:
        step.status = f"failed ({exc})"
    step.seconds = round(time.monotonic() - start, 1)
    return stdout


def _environment_of(stdout: str) -> dict:
    """The probe's line, wherever it is among the output (a driver or library may warn before or after it)."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    return json.loads(lines[-1].removeprefix(MARK)) if lines else {}


def _write(out: Path, done: list[Step], env: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "steps": [asdict(s) for s in done]},
                                                   indent=2))
    lines = ["# distlocal GPU check", "", f"Host {env.get('host', '?')}: {env.get('gpus') or 'no CUDA device'}, "
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), ray {env.get('ray')}, cupy "
             f"{env.get('cupy')}, nvidia-smi: {env.get('nvidia_smi')}, Python {env.get('python_path')}"
             + (f"; {env['problem']}" if env.get("problem") else ""), "",
             "| step | result | seconds | what it checks |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:g} | {s.what} |" for s in done]
    for s in done:
        if s.output:
            lines += ["", f"## {s.name}", "", "```", s.output.strip(), "```"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--only", help="comma-separated step names (also: " + ", ".join(OPTIONAL) + ")")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="all steps together stop after this long")
    parser.add_argument("--probe", choices=["environment", "oom"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        {"environment": _environment, "oom": _oom}[args.probe]()
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    # The environment step always runs: it is what tells the others whether there is a CUDA device.
    only = set(args.only.split(",")) if args.only else set()
    todo = [s for s in steps(args.out) if not only or s.name in {"environment", *only}]
    todo += [make(args.out) for name, make in OPTIONAL.items() if name in only]
    env: dict = {}
    done: list[Step] = []
    deadline = time.monotonic() + args.budget_s
    for step in todo:
        print(f"gpu check: {step.name} ...", flush=True)
        stdout = _run(step, env, deadline - time.monotonic())
        if step.name == "environment":
            env = _environment_of(stdout)
            if step.status == "passed" and not env:
                step.status = "failed (no environment line in its output)"
        done.append(step)
        _write(args.out, done, env)
        print(f"gpu check: {step.name}: {step.status} ({step.seconds:g} s)", flush=True)
    print(f"report: {args.out / 'gpu_check.md'}")
    if not env.get("cuda_available"):
        print("no CUDA device here: only the environment was checked", file=sys.stderr)
        return 2
    return 0 if all(s.status == "passed" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
