"""tools/gpu_check.sh without a GPU: the environment step runs, the report is written, the CUDA steps say why not."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs for minutes: run the script itself")
def test_gpu_check_without_cuda_reports_the_environment_and_skips_the_rest(tmp_path):
    """Exit status 2, a Markdown and a JSON report; every step that needs CUDA is listed as skipped."""
    done = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, check=False, start_new_session=True)
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["environment"]["status"] == "passed"
    assert report["environment"]["cuda_available"] is False
    assert report["environment"]["torch"] == torch.__version__
    assert {s["status"] for name, s in steps.items() if name != "environment"} == {"skipped: no CUDA"}
    assert {"pytest -m gpu", "out of memory", "bench memory", "bench inference", "bench inference deployed",
            "bench pipeline"} <= set(steps)
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| pytest -m gpu | skipped: no CUDA |" in markdown
    assert "no CUDA device" in markdown
