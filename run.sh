#!/usr/bin/env bash
# Run the experiment written below on the given GPUs:
#
#   ./run.sh 0,3,4,5                      # 4 processes on GPUs 0, 3, 4 and 5
#   ./run.sh 1 --max_train_steps 100      # arguments after the GPU ids are appended to the command
#   RUN_SH_DRY_RUN=1 ./run.sh 0,1         # print the command instead of running it
#
# Without GPU ids it uses every GPU that nvidia-smi lists. Each run gets a free master port, so several
# runs can share a machine.
set -euo pipefail

# ---- EDIT YOUR EXPERIMENT HERE: the training script and its arguments --------------------------------------
SCRIPT=languini/projects/gpt/main.py
ARGS=(
    mini
    --gradient_accumulation_steps 1
    --eval_every 1000
    --log_terminal_every 20
    --log_metrics_every 20
    --log_grads_every 1000
)
# -----------------------------------------------------------------------------------------------------------

cd "$(dirname "$0")"

if [[ $# -gt 0 && $1 != -* ]]; then
    GPU_IDS=$1
    shift
    if [[ ! $GPU_IDS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        echo "error: GPU ids must look like 0 or 0,3,4,5; got '$GPU_IDS'" >&2
        exit 2
    fi
else
    if ! command -v nvidia-smi >/dev/null; then
        echo "usage: ./run.sh GPU_IDS [EXTRA ARGS...]   e.g. ./run.sh 0,3,4,5 (no nvidia-smi to list GPUs)" >&2
        exit 2
    fi
    GPU_IDS=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi
NUM_PROCS=$(tr ',' '\n' <<<"$GPU_IDS" | wc -l)
PYTHON=${PYTHON:-python3}
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')

COMMAND=(
    torchrun --nnodes=1 --node_rank=0 --nproc_per_node="$NUM_PROCS"
    --master_addr=localhost --master_port="$PORT"
    "$SCRIPT" "${ARGS[@]}" "$@"
)
echo "running on GPU(s) $GPU_IDS: $NUM_PROCS process(es), master_port $PORT" >&2
if [[ -n ${RUN_SH_DRY_RUN:-} ]]; then
    echo "CUDA_VISIBLE_DEVICES=$GPU_IDS ${COMMAND[*]}"
    exit 0
fi
export CUDA_VISIBLE_DEVICES=$GPU_IDS
exec "${COMMAND[@]}"
