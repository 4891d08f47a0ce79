"""Executors (local, Ray), the training loop, checkpoints and evaluation."""

import os

# Ray reads this when it is imported: under `uv run` it would otherwise rebuild this project's environment for
# every worker in a temporary folder; distlocal's workers use the driver's interpreter and packages as they are.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
