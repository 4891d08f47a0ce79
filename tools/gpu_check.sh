#!/usr/bin/env bash
# Every GPU path of distlocal in one command, for the first GPU machine a session is lent: writes
# OUT/gpu_check.md and OUT/gpu_check.json (what ran, pass / fail / skipped, timings, the output's tail).
#
#   tools/gpu_check.sh [OUT]            # default: gpu-check-<UTC time>; at most GPU_CHECK_BUDGET_S (300) seconds,
#                                       # so one 10-minute call holds it with room for a rerun
#
# It runs on the image's own Python and torch (the CUDA build to check): it never installs anything, needs no uv,
# and works offline. On an image with torch but not Ray / MLflow, carry them in first (from the CPU machine):
#   ../shared/device/pack-site.sh       # EXTRA_PACKAGES=pytest if the image has no pytest
#   then there: mkdir -p /tmp/site && tar -xJf .carry/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
# Steps whose packages are missing are skipped, naming them. Without CUDA only the environment step runs; the
# report says so and the exit status is 2. A report is always written, even without any Python.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The first Python that has torch: the image's (python3), else a project environment synced before (.venv).
py=""
for candidate in python3 .venv/bin/python python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
        py=$candidate
        break
    fi
done
if [ -z "$py" ]; then  # no torch anywhere: a Python still writes the report, with the environment's problem
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then py=$candidate; break; fi
    done
fi
if [ -z "$py" ]; then
    reason="no python3 on PATH ($PATH)"
    printf '{"environment": {"problem": "%s"}, "steps": [{"name": "environment", "status": "failed", "output": "%s"}]}\n' \
        "$reason" "$reason" >"$out/gpu_check.json"
    printf '# distlocal GPU check\n\n| step | result | seconds | what it checks |\n|---|---|---|---|\n| environment | failed | 0 | %s |\n' \
        "$reason" >"$out/gpu_check.md"
    echo "gpu check: $reason; report: $out/gpu_check.md" >&2
    exit 2
fi
exec "$py" tools/gpu_check.py --out "$out" ${GPU_CHECK_BUDGET_S:+--budget-s "$GPU_CHECK_BUDGET_S"}
