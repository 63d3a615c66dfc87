#!/usr/bin/env bash
# One machine, several GPUs: a Dask scheduler on 127.0.0.1 and one worker process per GPU, each
# pinned to its GPU (CUDA_VISIBLE_DEVICES) and declaring --resources GPU=1. Plain `dask worker`,
# not dask-cuda: every dask-cuda release pins dask and distributed to other versions than the tested
# ones. Prints a line once every worker has joined (start deepmr after it, so that ISM tasks ask for
# GPU=1); Ctrl-C stops them all.
# Usage: deploy/local_gpus.sh [PORT [THREADS_PER_WORKER]]   (defaults 8786, 4; dashboard on PORT+1)
#   then: deepmr run PIPELINE.yaml --cluster tcp://127.0.0.1:PORT
set -euo pipefail
port=${1:-8786}
threads=${2:-4}
address=tcp://127.0.0.1:$port
n_gpus=$(nvidia-smi --list-gpus | wc -l)
trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT
dask scheduler --host 127.0.0.1 --port "$port" --dashboard-address "127.0.0.1:$((port + 1))" &
for ((gpu = 0; gpu < n_gpus; gpu++)); do
  CUDA_VISIBLE_DEVICES=$gpu dask worker "$address" --host 127.0.0.1 --name "gpu$gpu" \
    --nthreads "$threads" --resources GPU=1 &
done
python -c 'import sys; from distributed import Client
Client(sys.argv[1], timeout="60s").wait_for_workers(int(sys.argv[2]), timeout=300)' "$address" "$n_gpus"
echo "local_gpus.sh: $n_gpus GPU worker(s) ready at $address" >&2
wait
