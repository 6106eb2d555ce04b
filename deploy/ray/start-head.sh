#!/usr/bin/env bash
# Multi-node vLLM, head node: start Ray, wait for the workers, then serve the model on this node.
# Usage: deploy/ray/start-head.sh MODEL NUM_NODES   (run from the repository root or the Bento's src/)
set -euo pipefail
model=${1:?catalog model name}
num_nodes=${2:?total number of nodes, head included}
ray_port=${RAY_PORT:-6379}
ray start --head --port "$ray_port" --dashboard-host 0.0.0.0 --disable-usage-stats
python deploy/ray/wait_for_nodes.py "$num_nodes" --timeout-s "${RAY_WAIT_S:-900}"
# vLLM's Ray executor joins the running cluster instead of starting its own.
export RAY_ADDRESS=127.0.0.1:$ray_port
exec bentoml serve service:ShardBento --host 0.0.0.0 --port "${PORT:-3000}" --arg "model=$model"
