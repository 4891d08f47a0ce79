"""The code base stays ruff clean (checked as part of the test suite)."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean():
    """`ruff check` reports nothing on the package and the tests."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "distlocal", "tests"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
