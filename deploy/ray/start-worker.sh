#!/usr/bin/env bash
# Multi-node vLLM, worker node: join the head's Ray cluster and stay in the foreground.
# Usage: deploy/ray/start-worker.sh HEAD_ADDRESS   (e.g. 10.0.0.5:6379)
set -euo pipefail
head=${1:?head address host:port}
exec ray start --address "$head" --block --disable-usage-stats
