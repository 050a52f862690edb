"""Find the largest batch size that fits: `python3 languini/common_lib/throughput_sweep.py PROJECT [PRESET] --gpu N`.

Doubles the batch size until the first out-of-memory, then bisects between the last fit and the first
failure. Each trial runs `python -m languini.tools.throughput` in a fresh process (so one OOM cannot
poison the next trial) and becomes a row of `languini/projects/<project>/throughput_results.csv`.
On CPU there is no OOM to find: a trial "fits" when its peak memory stays within `--memory_budget_gb`.
A trial that fails because cuBLAS or cuDNN could not allocate their workspace (`*_STATUS_ALLOC_FAILED`),
as happens just below the memory limit, did not fit either: the search bisects on, it does not stop.
"""

import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from languini.common_lib.atomic_io import atomic_write_text
from languini.common_lib.config import split_tool_flags
from languini.common_lib.errors import UserError, exit_on_user_error
from languini.projects import project_dir
from languini.tools.throughput import OOM_EXIT_CODE, THROUGHPUT_FLAGS, check_timing_options, is_oom_text
from languini.tools.tool_args import parse_tool_args
from languini.train_lib.train_config import TrainConfig

SWEEP_FLAGS = {
    "gpu": (int, -1, "CUDA device index for the trials (sets CUDA_VISIBLE_DEVICES); -1 = as visible"),
    "memory_budget_gb": (float, 0.0, "CPU only (required there): a batch fits when its peak RSS stays below this"),
    "start_batch_size": (int, 1, "first batch size tried"),
    "max_batch_size": (int, 4096, "largest batch size tried"),
    "csv": (str, "", "results file (default: languini/projects/<project>/throughput_results.csv)"),
    **{name: spec for name, spec in THROUGHPUT_FLAGS.items() if name != "json"},
}
PASSED_TO_TRIALS = ("steps", "warmup", "peak_tflops")


def find_largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = 4096) -> tuple[int, list[int]]:
    """Largest batch size b in [start, limit] with fits(b), for a monotone `fits` (what fits, fits when
    smaller). Doubling brackets the first failure, bisection narrows it. Returns (b or 0, sizes tried)."""
    tried: list[int] = []

    def check(b: int) -> bool:
        tried.append(b)
        return fits(b)

    if start > limit or not check(start):
        return 0, tried
    good, bad = start, None
    while bad is None:
        candidate = min(2 * good, limit)
        if candidate == good:
            return good, tried
        if check(candidate):
            good = candidate
        else:
            bad = candidate
    while bad - good > 1:
        middle = (good + bad) // 2
        if check(middle):
            good = middle
        else:
            bad = middle
    return good, tried


def largest_message(largest: int, max_batch_size: int) -> str:
    """The sweep's verdict: the memory limit, or only the --max_batch_size cap when every size tried fit."""
    if largest >= max_batch_size:
        return (
            f"largest batch size tried: {largest}, the --max_batch_size cap, and it fit: "
            "the memory limit is higher (raise --max_batch_size to find it)"
        )
    return f"largest batch size that fits: {largest} ({largest + 1} ran out of memory)"


def csv_columns(cfg) -> list[str]:
    """Row layout: the run, the project's own model fields, then the measurements."""
    model_fields = [f.name for f in dataclasses.fields(cfg) if f.name not in {g.name for g in dataclasses.fields(TrainConfig)}]
    return [
        "timestamp", "project", "preset", "train_batch_size", "seq_len", "vocab_size", *model_fields,
        "device", "precision", "compile", "peak_memory_mb", "step_ms", "tokens_per_second",
        "flops_per_token", "mfu", "oom",
    ]  # fmt: skip


def make_row(cfg, batch_size: int, result: dict) -> dict:
    """One CSV row from a trial's throughput JSON (measurement columns stay empty after an OOM)."""
    row = {name: getattr(cfg, name) for name in csv_columns(cfg) if hasattr(cfg, name)}
    row.update(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"), train_batch_size=batch_size, oom=result["oom"])
    for column, key in [("step_ms", "step_ms_median"), ("peak_memory_mb", "peak_memory_mb"), ("device", "device"),
                        ("precision", "precision"), ("tokens_per_second", "tokens_per_second"),
                        ("flops_per_token", "flops_per_token"), ("mfu", "mfu")]:  # fmt: skip
        row[column] = result.get(key, "")
    return row


def append_rows(path: str, columns: list[str], rows: list[dict]):
    """Append rows to the CSV (header written once); rewritten atomically so a crash never truncates it."""
    old = ""
    if os.path.isfile(path):
        with open(path, newline="") as f:
            old = f.read()
        header = next(csv.reader(io.StringIO(old)), [])
        if header != columns:
            raise UserError(f"{path} has other columns than this config's rows; pass --csv NEW_FILE")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerows({c: ("" if row.get(c) is None else row.get(c, "")) for c in columns} for row in rows)
    atomic_write_text(path, old + buf.getvalue())


def run_trial(trial_argv: list[str], batch_size: int, env: dict) -> dict:
    """Measure one batch size in a fresh process; {'oom': True} when it ran out of memory (exit code 3, killed,
    or a failure whose output is a CUDA library's out-of-memory message)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "languini.tools.throughput", *trial_argv,
               "--train_batch_size", str(batch_size), "--json", out]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode == OOM_EXIT_CODE or proc.returncode in (-9, 137):  # 137/-9: killed, e.g. by the OOM killer
            return {"oom": True}
        if proc.returncode != 0 and is_oom_text(proc.stderr + proc.stdout):
            return {"oom": True}
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
            raise UserError(f"the trial at batch size {batch_size} failed (exit {proc.returncode}): {lines[-1]}")
        with open(out) as f:
            return json.load(f)


def _trial_environment(cfg, gpu: int) -> tuple[dict, bool]:
    """(environment for the trials, whether they run on CPU); clear errors when no CUDA device is there."""
    env = dict(os.environ)
    if cfg.device == "cpu":
        return env, True
    if not torch.cuda.is_available():
        raise UserError("no CUDA device is available; to sweep on CPU pass --device cpu --memory_budget_gb G")
    if gpu >= 0:
        if gpu >= torch.cuda.device_count():
            raise UserError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) visible")
        visible = env.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
    return env, False


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "throughput_sweep.py PROJECT [PRESET] [--config flags] --gpu N | --device cpu --memory_budget_gb G"
    project, cfg, opts = parse_tool_args(argv, usage, SWEEP_FLAGS)
    if cfg.gradient_accumulation_steps != 1:
        raise UserError("the sweep measures single forward batches: leave --gradient_accumulation_steps at 1")
    check_timing_options(opts)
    if not 1 <= opts.start_batch_size <= opts.max_batch_size:
        raise UserError(
            f"need 1 <= --start_batch_size <= --max_batch_size; got {opts.start_batch_size}, {opts.max_batch_size}"
        )
    env, on_cpu = _trial_environment(cfg, opts.gpu)
    budget = opts.memory_budget_gb
    if on_cpu and not (math.isfinite(budget) and budget > 0):
        raise UserError(
            f"on CPU there is no out-of-memory to find: --memory_budget_gb G must be a finite number > 0, got {budget}"
        )
    _, config_argv = split_tool_flags(argv[1:], SWEEP_FLAGS)
    trial_argv = [project, *config_argv] + [f"--{k}={opts[k]}" for k in PASSED_TO_TRIALS]
    csv_path = opts.csv or os.path.join(project_dir(project), "throughput_results.csv")
    columns = csv_columns(cfg)
    results: dict[int, dict] = {}

    def fits(batch_size: int) -> bool:
        print(f"trial: train_batch_size {batch_size} ...", flush=True)
        result = run_trial(trial_argv, batch_size, env)
        if on_cpu and not result["oom"]:
            result["oom"] = result["peak_memory_mb"] > opts.memory_budget_gb * 1024
        results[batch_size] = result
        append_rows(csv_path, columns, [make_row(cfg, batch_size, result)])
        summary = "out of memory" if result["oom"] else f"{result['tokens_per_second']:,.0f} tokens/s"
        print(f"  batch {batch_size}: {summary}", flush=True)
        return not result["oom"]

    largest, _ = find_largest_fitting(fits, opts.start_batch_size, opts.max_batch_size)
    print(f"wrote {len(results)} rows to {csv_path}")
    if not largest:
        print(f"no batch size from {opts.start_batch_size} fits")
        return 1
    fastest = max((b for b, r in results.items() if not r["oom"]), key=lambda b: results[b]["tokens_per_second"])
    print(largest_message(largest, opts.max_batch_size))
    print(f"fastest: batch size {fastest} with {results[fastest]['tokens_per_second']:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
