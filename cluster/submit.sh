#!/usr/bin/env bash
# Run a distlocal command on a Ray cluster as a Ray job.
#
#   export RAY_ADDRESS=http://<head-node>:8265          # the Ray dashboard (job server) of the cluster
#   cluster/submit.sh train configs/tcga_nsclc_k4.yaml --set train.executor=ray --set run.dir=/shared/runs
#   cluster/submit.sh sweep configs/tcga_nsclc_k4.yaml --grid model.k=4,8 --grid model.rfr.enabled=true,false
#
# Environment: RAY_ADDRESS (required), RUNTIME_ENV (default cluster/runtime_env.yaml), SUBMIT_ARGS (extra
# `ray job submit` options, e.g. "--no-wait" or "--submission-id nsclc-k4").
#
# The driver (the entrypoint) only orchestrates: it runs on the head node with no GPU reserved and with
# CUDA_VISIBLE_DEVICES empty, so it can never take memory on a GPU that a stage actor needs. The stage actors
# get their GPUs from Ray's placement group (train.gpus_per_stage).
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://head-node:8265}"
if [ "$#" -eq 0 ]; then
  echo "usage: cluster/submit.sh COMMAND [ARGS...]   (a distlocal command: train, sweep, eval, ...)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
# shellcheck disable=SC2086  # SUBMIT_ARGS is a list of options on purpose
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env "${RUNTIME_ENV:-cluster/runtime_env.yaml}" --entrypoint-num-gpus 0 ${SUBMIT_ARGS:-} \
  -- env CUDA_VISIBLE_DEVICES= python -m distlocal.cli "$@"
