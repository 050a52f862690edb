#!/usr/bin/env bash
# Several trainings sharing a CPU: JOBS runs of PROJECT nano at once with torch's default threads, then
# the same with OMP_NUM_THREADS=1, then one run alone; prints the wall time of each. Shows what thread
# oversubscription costs on a shared machine.
#
#   benchmarks/shared_cpu.sh PROJECT DATA_ROOT [JOBS=3] [STEPS=30]
#   benchmarks/shared_cpu.sh deltanet data/demo
#
# Run folders go to a temporary folder that is removed at the end.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 PROJECT DATA_ROOT [JOBS] [STEPS]" >&2; exit 2; }
project=$1 data_root=$2 jobs=${3:-3} steps=${4:-30}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

train() {  # train RUN_NAME
    languini train "$project" nano --data_root "$data_root" --max_train_steps "$steps" --run_dir "$work/$1" \
        --eval_every 0 --logger_type none --no-progress_bar --log_terminal_every "$steps" >"$work/$1.log" 2>&1
}

timed() {  # timed LABEL THREADS(default|1) COUNT
    local start end
    start=$(date +%s.%N)
    for i in $(seq "$3"); do
        if [ "$2" = 1 ]; then OMP_NUM_THREADS=1 train "$1$i" & else train "$1$i" & fi
    done
    wait
    end=$(date +%s.%N)
    printf '%s: %s x %s steps of %s nano: %.1f s\n' "$1" "$3" "$steps" "$project" "$(echo "$end - $start" | bc)"
}

echo "$(nproc) CPUs"
timed default-threads default "$jobs"
timed one-thread-each 1 "$jobs"
timed alone default 1
