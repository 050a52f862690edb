#!/usr/bin/env bash
# Device benchmark for a lent GPU, one pass: the GPU tests, then the training throughput (bf16, compiled)
# of GPT mini/tiny/small and quasi-LSTM mini/tiny/small, the same runs eager (--compile none) for the
# small models, and the quasi-LSTM with the Triton scan (--scan triton) beside the PyTorch one; collected
# in benchmarks/results/<device>.json (device, torch version, tokens/s, MFU, peak memory, next to the
# original's RTX 3090 figures), with each variant's speed relative to its default run and the issue 7
# targets (GPT small MFU >= 55%, quasi-LSTM small Triton/PyTorch scan >= 2x).
#
#   benchmarks/gpu.sh             on a CUDA machine
#   benchmarks/gpu.sh --dry-run   the same pipeline on CPU: nano configs, tiny step counts, no GPU tests
#
# Environment: LANGUINI_BENCH_OUT (output folder, default benchmarks/results), LANGUINI_BENCH_RUNS
# ("project preset batch [config flags];..." to override the runs; the flags override the defaults below,
# e.g. "lstm small 64 --scan triton"), LANGUINI_BENCH_TIMEOUT (seconds per run, default 150).
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
  DEFAULT_RUNS+=";gpt small 64 --compile none;lstm small 64 --compile none"  # eager vs compiled
  DEFAULT_RUNS+=";lstm mini 128 --scan triton;lstm tiny 96 --scan triton;lstm small 64 --scan triton"
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

for i in "${!RUNS[@]}"; do
  read -r project preset batch extra <<< "${RUNS[$i]}"
  read -r -a extra_flags <<< "${extra:-}"
  echo "== throughput: $project $preset, train_batch_size $batch ${extra:-}"
  timeout "$RUN_TIMEOUT" python3 -m languini.tools.throughput "$project" "$preset" \
    --train_batch_size "$batch" "${FLAGS[@]}" "${extra_flags[@]}" --json "$WORK/run$i.json" \
    || echo "   failed or timed out: $project $preset ${extra:-} (exit $?)"
done

python3 - "$WORK" "$OUT_DIR" "$DRY_RUN" "$GPU_TESTS_RC" "${RUNS[@]}" <<'PYTHON'
import json, os, re, sys

from languini.common_lib.atomic_io import atomic_write_json
from languini.tools.compute_classes import reference_tokens_per_second

work, out_dir, dry_run, gpu_tests_rc, runs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5:]
results, device, torch_version = [], None, None
for i, run in enumerate(runs):
    project, preset, batch, *extra = run.split()
    path = os.path.join(work, f"run{i}.json")
    row = {"project": project, "preset": preset, "train_batch_size": int(batch), "flags": " ".join(extra)}
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

# A run with extra flags is compared with the run of the same project, preset and batch without them.
default_tps = {(r["project"], r["preset"], r["train_batch_size"]): r.get("tokens_per_second")
               for r in results if not r["flags"]}
for row in results:
    base = default_tps.get((row["project"], row["preset"], row["train_batch_size"]))
    if row["flags"] and base and row.get("tokens_per_second"):
        row["speed_vs_default_run"] = row["tokens_per_second"] / base

def find(project, flags):
    return next((r for r in results if (r["project"], r["preset"], r["flags"]) == (project, "small", flags)), {})

gpt_mfu, triton_speedup = find("gpt", "").get("mfu"), find("lstm", "--scan triton").get("speed_vs_default_run")
targets = {
    "gpt_small_mfu": gpt_mfu, "gpt_small_mfu_target": 0.55,
    "gpt_small_mfu_met": None if gpt_mfu is None else gpt_mfu >= 0.55,
    "qlstm_small_triton_over_torch_scan": triton_speedup, "qlstm_small_triton_target": 2.0,
    "qlstm_small_triton_met": None if triton_speedup is None else triton_speedup >= 2.0,
}
summary = {"device": device, "torch_version": torch_version, "dry_run": dry_run,
           "gpu_tests_exit_code": None if gpu_tests_rc < 0 else gpu_tests_rc, "results": results,
           "issue7_targets": targets}
slug = re.sub(r"[^A-Za-z0-9]+", "_", device or "unknown").strip("_") + ("-dry-run" if dry_run else "")
path = os.path.join(out_dir, f"{slug}.json")
atomic_write_json(path, summary)
print(f"== wrote {path}")
for row in results:
    tps = f"{row['tokens_per_second']:,.0f} tokens/s" if row.get("tokens_per_second") else row.get("error", "OOM")
    mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
    vs = f", {row['speed_vs_default_run']:.2f}x the default run" if row.get("speed_vs_default_run") else ""
    name = " ".join(filter(None, [row["project"], row["preset"], f"B{row['train_batch_size']}", row["flags"]]))
    print(f"   {name}: {tps}{mfu}{vs}")
print(f"   issue 7 targets: {targets}")
sys.exit(0 if all(r.get("tokens_per_second") for r in results) else 1)
PYTHON
