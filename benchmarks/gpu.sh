#!/usr/bin/env bash
# Device benchmark for a lent GPU, one pass: the GPU tests, then the training throughput (bf16, compiled)
# of GPT mini/tiny/small and quasi-LSTM mini/tiny/small, collected in benchmarks/results/<device>.json
# (device, torch version, tokens/s, MFU, next to the original's RTX 3090 figures).
#
#   benchmarks/gpu.sh             on a CUDA machine
#   benchmarks/gpu.sh --dry-run   the same pipeline on CPU: nano configs, tiny step counts, no GPU tests
#
# Environment: LANGUINI_BENCH_OUT (output folder, default benchmarks/results), LANGUINI_BENCH_RUNS
# ("project preset batch;..." to override the runs), LANGUINI_BENCH_TIMEOUT (seconds per run, default 150).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${LANGUINI_BENCH_OUT:-benchmarks/results}"
RUN_TIMEOUT="${LANGUINI_BENCH_TIMEOUT:-150}"
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  DEFAULT_RUNS="gpt nano 4;lstm nano 4"
  FLAGS=(--device cpu --precision fp32 --compile none --seq_len 32 --steps 2 --warmup 1)
elif [[ -z "${1:-}" ]]; then
  DRY_RUN=0
  # Batch sizes near the best of a one-GPU sweep at seq_len 512 (the 3090's were smaller: 24 GB).
  DEFAULT_RUNS="gpt mini 128;gpt tiny 128;gpt small 64;lstm mini 128;lstm tiny 96;lstm small 64"
  FLAGS=(--device cuda --precision bf16 --compile default)
else
  echo "usage: benchmarks/gpu.sh [--dry-run]" >&2
  exit 2
fi
IFS=';' read -r -a RUNS <<< "${LANGUINI_BENCH_RUNS:-$DEFAULT_RUNS}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [[ $DRY_RUN == 1 ]]; then
  echo "== dry run: GPU tests skipped"
  GPU_TESTS_RC=-1
else
  echo "== GPU tests (pytest -m gpu)"
  timeout 240 python3 -m pytest -q -m gpu tests
  GPU_TESTS_RC=$?
fi

for run in "${RUNS[@]}"; do
  read -r project preset batch <<< "$run"
  echo "== throughput: $project $preset, train_batch_size $batch"
  timeout "$RUN_TIMEOUT" python3 -m languini.common_lib.throughput "$project" "$preset" \
    --train_batch_size "$batch" "${FLAGS[@]}" --json "$WORK/$project-$preset.json" \
    || echo "   failed or timed out: $project $preset (exit $?)"
done

python3 - "$WORK" "$OUT_DIR" "$DRY_RUN" "$GPU_TESTS_RC" "${RUNS[@]}" <<'PYTHON'
import json, os, re, sys

from languini.common_lib.atomic_io import atomic_write_json
from languini.common_lib.compute_classes import reference_tokens_per_second

work, out_dir, dry_run, gpu_tests_rc, runs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5:]
results, device, torch_version = [], None, None
for run in runs:
    project, preset, batch = run.split()
    path = os.path.join(work, f"{project}-{preset}.json")
    row = {"project": project, "preset": preset, "train_batch_size": int(batch)}
    if os.path.isfile(path):
        r = json.load(open(path))
        device, torch_version = r.get("device", device), r.get("torch_version", torch_version)
        keys = ["tokens_per_second", "mfu", "achieved_tflops", "step_ms_median", "peak_memory_mb", "flops_per_token",
                "precision", "compile", "params_total", "oom"]
        row.update({k: r.get(k) for k in keys})
    else:
        row["error"] = "failed or timed out"
    row["rtx3090_tokens_per_second"] = reference_tokens_per_second(project, preset)
    results.append(row)
summary = {"device": device, "torch_version": torch_version, "dry_run": dry_run,
           "gpu_tests_exit_code": None if gpu_tests_rc < 0 else gpu_tests_rc, "results": results}
slug = re.sub(r"[^A-Za-z0-9]+", "_", device or "unknown").strip("_") + ("-dry-run" if dry_run else "")
path = os.path.join(out_dir, f"{slug}.json")
atomic_write_json(path, summary)
print(f"== wrote {path}")
for row in results:
    tps = f"{row['tokens_per_second']:,.0f} tokens/s" if row.get("tokens_per_second") else row.get("error", "OOM")
    mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
    print(f"   {row['project']} {row['preset']} B{row['train_batch_size']}: {tps}{mfu}")
sys.exit(0 if all(r.get("tokens_per_second") for r in results) else 1)
PYTHON
