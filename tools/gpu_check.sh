#!/usr/bin/env bash
# Every GPU path of distlocal in one command, for the first GPU machine a session is lent: writes
# OUT/gpu_check.md and OUT/gpu_check.json (what ran, pass / fail / skipped, timings, the output's tail).
#
#   tools/gpu_check.sh [OUT]            # default: gpu-check-<UTC time>; about 10-15 minutes on one H100 / H200, of
#                                       # which up to 8 for bench inference deployed (it paints 20X slide files)
#
# On a GPU machine whose image has torch but not Ray / MLflow, carry them in first (from the CPU machine):
#   ../shared/device/pack-site.sh       # EXTRA_PACKAGES=pytest if the image has no pytest
#   then there: mkdir -p /tmp/site && tar -xJf .carry/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
# Without CUDA only the environment step runs; the report says so and the exit status is 2.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The image's own Python when it has what we need (its torch is the CUDA build), else the project's environment.
if python3 -c "import torch, ray" 2>/dev/null; then py=(python3); else py=(uv run --frozen python); fi
exec "${py[@]}" tools/gpu_check.py --out "$out"
