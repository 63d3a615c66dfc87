#!/usr/bin/env bash
# One scheduler and one single-threaded worker per local GPU, each pinned to its GPU.
# Usage: deploy/local_gpus.sh [PORT]; then: deepmr predict ... --cluster tcp://127.0.0.1:PORT
set -euo pipefail
port=${1:-8786}
n_gpus=$(nvidia-smi --list-gpus | wc -l)
dask scheduler --host 127.0.0.1 --port "$port" &
sleep 3
for ((gpu = 0; gpu < n_gpus; gpu++)); do
  CUDA_VISIBLE_DEVICES=$gpu dask worker "tcp://127.0.0.1:$port" --nworkers 1 --nthreads 1 \
    --resources GPU=1 --name "gpu$gpu" &
done
wait
