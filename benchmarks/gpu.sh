#!/usr/bin/env bash
# The GPU benchmark for a lent machine, in named parts, each well under 10 minutes including compilation,
# the runs in order of value:
#
#   (a) gpt        GPT small, bf16, compiled: tokens/s and MFU
#   (b) scan       quasi-LSTM small with --scan triton, then --scan torch: the Triton/PyTorch ratio
#   (c) gpt        GPT mini and medium (compiled), GPT small eager (--compile none) against (a)
#   (d) baselines  transformerpp small and deltanet small (chunked; --kernel fla when fla is importable),
#                  each only when its project folder has a project.py
#   (e) eval       final-evaluation speed: batched sliding windows against one window at a time (same sums)
#       tests      pytest -m gpu
#
# Needs only a checkout and a python3 with torch (no pip, no network): PYTHONPATH is set to the repository
# root. Each result is written as soon as its run ends (DIR/<run>.json), and DIR/summary.json is rebuilt
# from whatever results DIR holds after every run, so a stopped part keeps what it measured.
#
# usage: benchmarks/gpu.sh [--part P[,P...]] [--only RUN[,RUN...]] [--out DIR] [--skip-tests] [--skip-done]
#                          [--timeout S] [--budget S] [--dry-run] [--cpu-smoke]
#        benchmarks/gpu.sh --summary DIR                         rebuild DIR/summary.json
#        benchmarks/gpu.sh --eval-speed PROJECT PRESET [flags]   the evaluation-speed measurement alone
#
#   --part        tests, gpt, scan, baselines, eval or all (default all: every run by value, tests last)
#   --only        these runs (names as --dry-run lists them) instead of parts
#   --out DIR     result folder (default benchmarks/results/<device>/, e.g. .../NVIDIA_H200/)
#   --skip-tests  leave out pytest -m gpu
#   --skip-done   leave out runs whose result in DIR has no error (to continue a stopped pass)
#   --timeout S   limit of one throughput or evaluation run (default 180; the tests get 300)
#   --budget S    start no run after S seconds and cut the last one to fit (default 540; 0 = none)
#   --dry-run     print the exact commands, run nothing
#   --cpu-smoke   run the tiniest variant of each command on CPU (nano, fp32, eager, 1 step), to prove
#                 that each starts; results go to a temporary folder unless --out is given
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="benchmarks/gpu.sh"  # run from $ROOT
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${LANGUINI_PYTHON:-python3}"

# The Python half: recording a run's result, the summary, and the evaluation-speed measurement.
read -r -d '' HELPER_PY <<'PYTHON'
import json, os, sys, time

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)

def record(path, run_id, part, order, rc, seconds, limit, log, command):
    """Add how the run went to its result file, or write one that says why there is no result."""
    run = {"id": run_id, "part": part, "order": int(order), "command": command, "exit_code": int(rc),
           "seconds": round(float(seconds), 1)}
    result = load(path)
    if result is None:
        tail = open(log, errors="replace").read().splitlines()[-15:] if os.path.isfile(log) else []
        reason = f"timed out after {limit} s" if int(rc) in (124, 137) else f"exit code {rc}"
        result = {"error": reason, "output_tail": tail}
    result["run"] = run
    write_json(path, result)

ROW_KEYS = ["project", "preset", "precision", "compile", "train_batch_size", "seq_len", "tokens_per_second",
            "step_ms_median", "step_ms_std", "timed_steps", "mfu", "mfu_causal_attention", "achieved_tflops",
            "achieved_tflops_causal", "flops_per_token", "flops_per_token_causal", "peak_memory_mb",
            "rtx3090_tokens_per_second", "oom", "error"]

def ratio(a, b):
    return a / b if a and b else None

def summary(folder):
    results = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name != "summary.json":
            r = load(os.path.join(folder, name))
            if isinstance(r, dict):
                results[name[:-5]] = r
    order = sorted(results, key=lambda k: (results[k].get("run", {}).get("order", 999), k))
    device = next((r["device"] for r in results.values() if r.get("device")), None)
    torch_version = next((r["torch_version"] for r in results.values() if r.get("torch_version")), None)
    rows = {}
    for k in order:
        r = results[k]
        row = {"command": r.get("run", {}).get("command"), "seconds": r.get("run", {}).get("seconds")}
        if "batched" in r:  # the evaluation-speed run
            row.update({key: r.get(key) for key in ("project", "preset", "precision", "windows", "batched",
                        "one_window_at_a_time", "speedup", "same_numbers", "loss_relative_difference", "error")})
        elif "pytest_exit_code" in r:
            row.update({key: r.get(key) for key in ("pytest_exit_code", "pytest_summary", "error")})
        else:
            row.update({key: r[key] for key in ROW_KEYS if key in r})
        rows[k] = row

    def tps(k):
        return results.get(k, {}).get("tokens_per_second")

    small = results.get("gpt_small_compiled", {})
    mfu, scan_ratio = small.get("mfu"), ratio(tps("lstm_small_scan_triton"), tps("lstm_small_scan_torch"))
    targets = {
        "gpt_small_mfu": mfu, "gpt_small_mfu_causal_attention": small.get("mfu_causal_attention"),
        "gpt_small_mfu_target": 0.55, "gpt_small_mfu_met": None if mfu is None else mfu >= 0.55,
        "qlstm_small_triton_over_torch_scan": scan_ratio, "qlstm_small_triton_target": 2.0,
        "qlstm_small_triton_met": None if scan_ratio is None else scan_ratio >= 2.0,
    }
    evaluation = results.get("eval_gpt_small", {})
    comparisons = {
        "gpt_small_compiled_over_eager": ratio(tps("gpt_small_compiled"), tps("gpt_small_eager")),
        "deltanet_small_fla_over_chunked": ratio(tps("deltanet_small_fla"), tps("deltanet_small_compiled")),
        "transformerpp_small_over_gpt_small": ratio(tps("transformerpp_small_compiled"), tps("gpt_small_compiled")),
        "eval_batched_over_one_window": evaluation.get("speedup"),
        "eval_same_numbers": evaluation.get("same_numbers"),
    }
    tests = results.get("gpu_tests", {})
    out = {"device": device, "torch_version": torch_version, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "smoke": any(r.get("run", {}).get("command", "").find("--device cpu") >= 0 for r in results.values()),
           "targets": targets, "comparisons": comparisons,
           "gpu_tests_exit_code": tests.get("pytest_exit_code"), "results": rows}
    write_json(os.path.join(folder, "summary.json"), out)
    return out

def print_summary(folder):
    s = summary(folder)
    print(f"== {os.path.join(folder, 'summary.json')}: {s['device']}, torch {s['torch_version']}")
    for k, row in s["results"].items():
        if row.get("error"):
            text = row["error"]
        elif row.get("oom"):
            text = "out of memory"
        elif "speedup" in row:
            text = f"batched {row['speedup']:.1f}x one window at a time, same numbers: {row['same_numbers']}"
        elif "pytest_exit_code" in row:
            text = f"pytest exit {row['pytest_exit_code']}: {row['pytest_summary']}"
        else:
            mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
            causal = f" ({row['mfu_causal_attention']:.1%} causal)" if row.get("mfu_causal_attention") is not None else ""
            text = f"{row.get('tokens_per_second') or 0:,.0f} tokens/s{mfu}{causal}"
        print(f"   {k}: {text}")
    print(f"   targets: {json.dumps(s['targets'])}")
    print(f"   comparisons: {json.dumps(s['comparisons'])}")

def pytest_result(path, log, rc):
    lines = open(log, errors="replace").read().splitlines() if os.path.isfile(log) else []
    last = next((line.strip("= ") for line in reversed(lines) if " in " in line and ("passed" in line or
                 "failed" in line or "skipped" in line or "error" in line or "deselected" in line)), None)
    result = {"pytest_exit_code": int(rc), "pytest_summary": last}
    if int(rc) in (124, 137):
        result["error"] = "timed out"
    write_json(path, result)

def eval_speed(argv):
    """Batched sliding windows against one window at a time: the same sums, and how much faster."""
    import numpy as np
    import torch

    from languini.common_lib.device import (autocast_context, configure_device, device_name, resolve_device,
                                            resolve_precision, synchronize)
    from languini.common_lib.errors import exit_on_user_error
    from languini.tools.flops import build_model
    from languini.tools.tool_args import parse_tool_args
    from languini.train_lib.eval_metrics import metrics_from_sums
    from languini.train_lib.eval_protocols import evaluate_sliding_window, window_starts

    flags = {"tokens": (int, 131072, "length of the random token stream"),
             "json": (str, "", "also write the results to this JSON file")}

    @exit_on_user_error
    def main():
        usage = "gpu.sh --eval-speed PROJECT PRESET [--config flags] [--tokens N] [--json FILE]"
        project, cfg, opts = parse_tool_args(argv, usage, flags)
        device = resolve_device(cfg.device)
        configure_device(device)
        precision = resolve_precision(cfg.precision, device)
        torch.manual_seed(cfg.seed)
        model = build_model(project, cfg, device).eval()
        tokens = np.random.default_rng(cfg.seed).integers(3, cfg.vocab_size, opts.tokens, dtype=np.int64)

        def timed(batch_size, stream):
            synchronize(device)
            start = time.perf_counter()
            sums = evaluate_sliding_window(model, stream, cfg.seq_len, cfg.last_n, batch_size,
                                           autocast_context(precision, device), progress=False)
            synchronize(device)
            return sums.cpu(), time.perf_counter() - start

        warm = tokens[: cfg.seq_len + 4 * cfg.last_n]
        timed(cfg.test_batch_size, warm), timed(1, warm)  # kernels chosen, memory allocated
        batched, batched_s = timed(cfg.test_batch_size, tokens)
        single, single_s = timed(1, tokens)
        m_batched, m_single = metrics_from_sums(batched, False), metrics_from_sums(single, False)
        difference = abs(m_batched["loss"] - m_single["loss"]) / abs(m_single["loss"])
        scored = int(opts.tokens) - 1
        result = {
            "project": project, "preset": cfg.preset, "device": device_name(device),
            "torch_version": torch.__version__, "precision": precision, "seq_len": cfg.seq_len,
            "last_n": cfg.last_n, "tokens": int(opts.tokens),
            "windows": len(window_starts(len(tokens), cfg.seq_len, cfg.last_n)),
            "batched": {"test_batch_size": cfg.test_batch_size, "seconds": batched_s,
                        "scored_tokens_per_second": scored / batched_s, "loss": m_batched["loss"],
                        "top1": m_batched["top1"], "n_tokens": m_batched["n_tokens"]},
            "one_window_at_a_time": {"seconds": single_s, "scored_tokens_per_second": scored / single_s,
                                     "loss": m_single["loss"], "top1": m_single["top1"],
                                     "n_tokens": m_single["n_tokens"]},
            "speedup": single_s / batched_s,
            "loss_relative_difference": difference,
            # the same targets scored; the loss equal up to the rounding of a different batch shape
            "same_numbers": m_batched["n_tokens"] == m_single["n_tokens"] == scored
            and difference < (1e-5 if precision == "fp32" else 1e-2),
        }
        print(json.dumps(result, indent=2))
        if opts.json:
            write_json(opts.json, result)
        return 0 if result["same_numbers"] else 1

    return main()

if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "record":
        record(*args)
    elif mode == "pytest":
        pytest_result(*args)
    elif mode == "summary":
        print_summary(args[0])
    elif mode == "eval-speed":
        sys.exit(eval_speed(args))
PYTHON

usage() {
  echo "usage: benchmarks/gpu.sh [--part tests|gpt|scan|baselines|eval|all[,...]] [--only RUN[,...]] [--out DIR]" \
    "[--skip-tests] [--skip-done] [--timeout S] [--budget S] [--dry-run] [--cpu-smoke]" \
    "| --summary DIR | --eval-speed PROJECT PRESET [flags]" >&2
}
fail() {  # a mistake of the caller: one line, exit 2
  echo "error: $*" >&2
  exit 2
}

case "${1:-}" in
  --summary)
    [[ $# -eq 2 && -d "$2" ]] || fail "--summary needs one existing folder"
    exec "$PY" -c "$HELPER_PY" summary "$2" ;;
  --eval-speed)
    shift
    exec "$PY" -c "$HELPER_PY" eval-speed "$@" ;;
esac

PARTS="all" ONLY="" OUT_DIR="" SKIP_TESTS=0 SKIP_DONE=0 RUN_TIMEOUT=180 TESTS_TIMEOUT=300 BUDGET=540
DRY_RUN=0 SMOKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --part|--only|--out|--timeout|--budget)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || fail "$1 needs a value"
      case "$1" in
        --part) PARTS="$2" ;;
        --only) ONLY="$2" ;;
        --out) OUT_DIR="$2" ;;
        --timeout) RUN_TIMEOUT="$2" ;;
        --budget) BUDGET="$2" ;;
      esac
      shift 2 ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --skip-done) SKIP_DONE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown option '$1' (benchmarks/gpu.sh --help lists the options)" ;;
  esac
done
[[ "$RUN_TIMEOUT" =~ ^[0-9]+$ && "$RUN_TIMEOUT" -gt 0 ]] || fail "--timeout expects seconds, got '$RUN_TIMEOUT'"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || fail "--budget expects seconds, got '$BUDGET'"
for part in ${PARTS//,/ }; do
  case "$part" in tests|gpt|scan|baselines|eval|all) ;; *) fail "unknown part '$part'; valid: tests, gpt, scan, baselines, eval, all" ;; esac
done

# ---- the runs, in order of value: name|part|kind|project|preset|train_batch_size|compile|extra flags ----
has_project() { [[ -f "languini/projects/$1/project.py" ]]; }
importable() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

RUNS=(
  "gpt_small_compiled|gpt|throughput|gpt|small|64|default|"
  "lstm_small_scan_triton|scan|throughput|lstm|small|64|default|--scan triton"
  "lstm_small_scan_torch|scan|throughput|lstm|small|64|default|--scan torch"
  "gpt_mini_compiled|gpt|throughput|gpt|mini|128|default|"
  "gpt_medium_compiled|gpt|throughput|gpt|medium|64|default|"
  "gpt_small_eager|gpt|throughput|gpt|small|64|none|"
)
BASELINE_NOTES=()
if has_project transformerpp; then
  RUNS+=("transformerpp_small_compiled|baselines|throughput|transformerpp|small|64|default|")
else
  BASELINE_NOTES+=("transformerpp: no languini/projects/transformerpp/project.py yet")
fi
if has_project deltanet; then
  RUNS+=("deltanet_small_compiled|baselines|throughput|deltanet|small|64|default|")
  if importable fla && grep -q '"fla"' languini/projects/deltanet/*.py; then
    RUNS+=("deltanet_small_fla|baselines|throughput|deltanet|small|64|default|--kernel fla")
  else
    BASELINE_NOTES+=("deltanet --kernel fla: the fla package is not importable (or the project has no fla kernel)")
  fi
else
  BASELINE_NOTES+=("deltanet: no languini/projects/deltanet/project.py yet")
fi
RUNS+=("eval_gpt_small|eval|eval|gpt|small|64|none|")
RUNS+=("gpu_tests|tests|tests|||||")

selected() {  # name part
  if [[ -n "$ONLY" ]]; then
    [[ ",$ONLY," == *",$1,"* ]]
    return
  fi
  [[ "$2" == tests && $SKIP_TESTS == 1 ]] && return 1
  [[ ",$PARTS," == *",all,"* || ",$PARTS," == *",$2,"* ]]
}
SELECTED=()
declare -A VALUE_RANK=()  # a run's place in RUNS: the order of the summary, whichever call wrote it
for i in "${!RUNS[@]}"; do
  IFS='|' read -r name part _ <<< "${RUNS[$i]}"
  VALUE_RANK[$name]=$((i + 1))
  selected "$name" "$part" && SELECTED+=("${RUNS[$i]}")
done
if [[ -n "$ONLY" ]]; then
  for name in ${ONLY//,/ }; do
    printf '%s\n' "${RUNS[@]}" | grep -q "^$name|" || fail "unknown run '$name'; --dry-run lists them"
  done
fi

# ---- where the results go ----
if [[ $SMOKE == 1 ]]; then
  DEVICE_FLAGS=(--device cpu)
  if [[ -z "$OUT_DIR" ]]; then
    OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/languini-gpu-smoke.XXXXXX")"
  fi
elif [[ $DRY_RUN == 1 ]]; then
  DEVICE_FLAGS=(--device cuda)
  OUT_DIR="${OUT_DIR:-benchmarks/results/<device>}"
else
  DEVICE_FLAGS=(--device cuda)
  DEVICE="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')" \
    || fail "$PY cannot import torch"
  [[ -n "$DEVICE" ]] || fail "no CUDA device: on a machine without a GPU use --dry-run [--cpu-smoke]"
  OUT_DIR="${OUT_DIR:-benchmarks/results/$(echo "$DEVICE" | sed -E 's/[^A-Za-z0-9]+/_/g; s/^_+|_+$//g')}"
fi
[[ $DRY_RUN == 1 && $SMOKE == 0 ]] || mkdir -p "$OUT_DIR" || fail "cannot create --out folder '$OUT_DIR'"

# ---- the command of one run ----
command_of() {  # spec -> CMD (array)
  local name part kind project preset batch compile extra
  IFS='|' read -r name part kind project preset batch compile extra <<< "$1"
  local -a extra_flags=()
  read -r -a extra_flags <<< "$extra"
  local json="$OUT_DIR/$name.json"
  case "$kind" in
    throughput)
      if [[ $SMOKE == 1 ]]; then
        CMD=("$PY" -m languini.tools.throughput "$project" nano --train_batch_size 2 --seq_len 32 --precision fp32
          --compile none "${extra_flags[@]}" --steps 1 --warmup 0 "${DEVICE_FLAGS[@]}" --json "$json")
        [[ "$extra" == *"--scan triton"* ]] && CMD=(env TRITON_INTERPRET=1 "${CMD[@]}")  # Triton's CPU interpreter
      else
        CMD=("$PY" -m languini.tools.throughput "$project" "$preset" --train_batch_size "$batch" --precision bf16
          --compile "$compile" "${extra_flags[@]}" "${DEVICE_FLAGS[@]}" --json "$json")
      fi ;;
    eval)
      if [[ $SMOKE == 1 ]]; then
        CMD=(bash "$SELF" --eval-speed "$project" nano --seq_len 32 --last_n 16 --test_batch_size 4 --precision fp32
          --tokens 200 "${DEVICE_FLAGS[@]}" --json "$json")
      else
        CMD=(bash "$SELF" --eval-speed "$project" "$preset" --test_batch_size "$batch" --precision bf16
          --tokens 131072 "${DEVICE_FLAGS[@]}" --json "$json")
      fi ;;
    tests)
      if [[ $SMOKE == 1 ]]; then
        CMD=("$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests)
      else
        CMD=("$PY" -m pytest -q -m gpu -p no:cacheprovider tests)
      fi ;;
  esac
}

cpu_skip_reason() {  # spec -> why its smoke variant cannot run on CPU (empty when it can)
  case "$1" in
    *"--scan triton"*) importable triton || echo "the Triton scan needs the triton package on CPU" ;;
    *"--kernel fla"*) echo "the fla kernels need a GPU" ;;
  esac
}

timeout_of() {  # kind
  [[ "$1" == tests ]] && echo "$TESTS_TIMEOUT" || echo "$RUN_TIMEOUT"
}

# ---- dry run: the exact commands ----
if [[ $DRY_RUN == 1 || $SMOKE == 1 ]]; then
  echo "# from $ROOT, with PYTHONPATH=$ROOT; results in $OUT_DIR"
  for spec in "${SELECTED[@]}"; do
    IFS='|' read -r name part kind _ <<< "$spec"
    command_of "$spec"
    printf '# %s (part %s)\ntimeout -k 10 %s %s\n' "$name" "$part" "$(timeout_of "$kind")" "${CMD[*]}"
  done
  for note in "${BASELINE_NOTES[@]}"; do
    selected baselines baselines && echo "# not run: $note"
  done
  [[ $SMOKE == 1 ]] || exit 0
  echo "== CPU smoke: the tiniest variant of each command"
fi

# ---- the runs ----
LOG="$OUT_DIR/log.txt"
START=$SECONDS
FAILED=0
for spec in "${SELECTED[@]}"; do
  IFS='|' read -r name part kind _ <<< "$spec"
  json="$OUT_DIR/$name.json"
  if [[ $SMOKE == 1 ]]; then
    reason="$(cpu_skip_reason "$spec")"
    if [[ -n "$reason" ]]; then
      echo "== $name: skipped on CPU ($reason)"
      continue
    fi
  fi
  if [[ $SKIP_DONE == 1 && -f "$json" ]] && ! grep -q '"error"' "$json"; then
    echo "== $name: done already ($json)"
    continue
  fi
  limit="$(timeout_of "$kind")"
  if [[ "$BUDGET" -gt 0 ]]; then
    left=$((BUDGET - (SECONDS - START)))
    if [[ $left -lt 30 ]]; then
      echo "== $name: not started, the --budget of $BUDGET s is spent (continue with --skip-done)"
      continue
    fi
    [[ $left -lt $limit ]] && limit=$left
  fi
  command_of "$spec"
  echo "== $name (part $part, limit $limit s): ${CMD[*]}" | tee -a "$LOG"
  rm -f "$json"
  run_log="$(mktemp)"
  run_start=$SECONDS
  timeout -k 10 "$limit" "${CMD[@]}" 2>&1 | tee "$run_log"
  rc=${PIPESTATUS[0]}
  cat "$run_log" >> "$LOG"
  if [[ "$kind" == tests ]]; then
    "$PY" -c "$HELPER_PY" pytest "$json" "$run_log" "$rc"
  fi
  "$PY" -c "$HELPER_PY" record "$json" "$name" "$part" "${VALUE_RANK[$name]}" "$rc" "$((SECONDS - run_start))" "$limit" \
    "$run_log" "timeout -k 10 $limit ${CMD[*]}"
  rm -f "$run_log"
  if [[ $rc -ne 0 ]]; then
    FAILED=$((FAILED + 1))
    echo "   $name failed (exit $rc)" | tee -a "$LOG"
  fi
  "$PY" -c "$HELPER_PY" summary "$OUT_DIR" > /dev/null
done

if compgen -G "$OUT_DIR/*.json" > /dev/null; then
  "$PY" -c "$HELPER_PY" summary "$OUT_DIR"
fi
echo "== results in $OUT_DIR (re-run a part: benchmarks/gpu.sh --part NAME --out $OUT_DIR)"
[[ $FAILED -eq 0 ]]
