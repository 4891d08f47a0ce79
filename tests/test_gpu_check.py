"""tools/gpu_check.sh without a GPU: the environment step runs, the report is written, the CUDA steps say why not."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _check(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=300, check=False, start_new_session=True, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs for minutes: run the script itself")
def test_gpu_check_without_uv_and_with_a_warning_reports_the_environment_and_skips_the_rest(tmp_path):
    """
    On a box without uv, whose Python warns on stderr at every start (as a too-old driver does): exit status 2, a
    Markdown and a JSON report; every step that needs CUDA is listed as skipped.
    """
    bin_dir, warns = tmp_path / "bin", tmp_path / "warns"
    bin_dir.mkdir()
    warns.mkdir()
    python3 = bin_dir / "python3"  # "the image's Python": this environment's, with its torch
    python3.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python3.chmod(0o755)
    (warns / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "sys.stderr.write('UserWarning: CUDA initialization: the NVIDIA driver on your system is too old\\n')\n"
        "atexit.register(lambda: sys.stderr.write('UserWarning: leaked semaphore objects\\n'))\n")
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(warns)}
    assert shutil.which("uv", path=env["PATH"]) is None
    done = _check(tmp_path / "out", env)
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["environment"]["status"] == "passed"
    assert "too old" in steps["environment"]["output"]  # the warning was there, and did not break the report
    assert report["environment"]["cuda_available"] is False
    assert report["environment"]["torch"] == torch.__version__
    assert report["environment"]["python_path"] == sys.executable
    assert {s["status"] for name, s in steps.items() if name != "environment"} == {"skipped: no CUDA"}
    assert {"pytest -m gpu", "out of memory", "bench memory", "bench inference", "bench pipeline"} <= set(steps)
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| pytest -m gpu | skipped: no CUDA |" in markdown
    assert "no CUDA device" in markdown


def test_gpu_check_steps_fit_one_ten_minute_call_with_room_for_a_rerun():
    """The default steps stop within the budget, which leaves a 10-minute call half free; OpenSlide's is opt-in."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert gpu_check.BUDGET_S <= 300
    assert "bench inference deployed" not in {s.name for s in gpu_check.steps(Path("out"))}


def test_gpu_check_without_any_python_still_writes_a_report(tmp_path):
    """No Python on PATH at all (nor a checkout's .venv): the shell writes the report itself, naming the problem."""
    bin_dir, tools = tmp_path / "bin", tmp_path / "checkout" / "tools"
    bin_dir.mkdir()
    tools.mkdir(parents=True)
    for tool in ("bash", "env", "dirname", "date", "mkdir"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    shutil.copy(ROOT / "tools" / "gpu_check.sh", tools)
    done = subprocess.run([str(tools / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "PATH": str(bin_dir)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no python3" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"][0]["status"] == "failed"
