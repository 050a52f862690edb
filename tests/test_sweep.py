"""The batch-size sweep: its search on a fake out-of-memory oracle, the CSV, and its errors."""

import csv
import json
import math
import subprocess

import pytest
import torch
from helpers import preset_config

from languini.common_lib.errors import UserError
from languini.tools import throughput_sweep
from languini.tools.throughput_sweep import (
    append_rows,
    csv_columns,
    find_largest_fitting,
    largest_message,
    main,
    make_row,
)


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 8, 9, 76, 100, 127, 128, 129, 1000])
def test_search_finds_the_largest_fitting_batch(capacity):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= capacity

    largest, tried = find_largest_fitting(fits, start=1, limit=4096)
    assert largest == capacity and tried == calls
    assert len(set(tried)) == len(tried)  # no batch size is measured twice
    assert len(tried) <= 2 * math.ceil(math.log2(capacity + 1)) + 2
    assert capacity + 1 in tried or capacity == 4096  # the first failure is bracketed exactly


def test_search_limits():
    assert find_largest_fitting(lambda b: False, start=4) == (0, [4])
    largest, tried = find_largest_fitting(lambda b: True, start=3, limit=40)
    assert largest == 40 and tried == [3, 6, 12, 24, 40]
    assert find_largest_fitting(lambda b: b <= 10, start=8, limit=64)[0] == 10


def test_rows_append_under_one_header(tmp_path):
    cfg = preset_config("gpt", "nano")
    path = str(tmp_path / "results.csv")
    result = {"oom": False, "step_ms_median": 12.5, "tokens_per_second": 1000.0, "device": "cpu",
              "precision": "fp32", "peak_memory_mb": 300.0, "flops_per_token": 5e6, "mfu": None}  # fmt: skip
    append_rows(path, csv_columns(cfg), [make_row(cfg, 8, result)])
    append_rows(path, csv_columns(cfg), [make_row(cfg, 16, {"oom": True})])
    rows = list(csv.DictReader(open(path)))
    assert [r["train_batch_size"] for r in rows] == ["8", "16"]
    assert rows[0]["h_dim"] == "128" and rows[0]["tokens_per_second"] == "1000.0" and rows[0]["mfu"] == ""
    assert rows[1]["oom"] == "True" and rows[1]["step_ms"] == ""
    with pytest.raises(UserError):
        append_rows(path, ["other", "columns"], [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_sweep_without_cuda_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpt", "tiny", "--gpu", "0"])
    assert exit_info.value.code == 2 and "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "--memory_budget_gb G must be a finite number > 0, got 0.0"),
        (["--memory_budget_gb", "-1"], "got -1.0"),
        (["--memory_budget_gb", "4", "--start_batch_size", "0"], "need 1 <= --start_batch_size <= --max_batch_size"),
        (["--memory_budget_gb", "4", "--start_batch_size", "8", "--max_batch_size", "2"], "got 8, 2"),
        (["--memory_budget_gb", "4", "--warmup", "-5"], "--warmup >= -1"),
    ],
)
def test_cpu_sweep_refuses_bad_flags_before_any_trial(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpt", "nano", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_cpu_sweep_end_to_end(tmp_path):
    path = tmp_path / "sweep.csv"
    argv = ["gpt", "nano", "--device", "cpu", "--seq_len", "32", "--memory_budget_gb", "64", "--start_batch_size", "2",
            "--max_batch_size", "4", "--steps", "1", "--warmup", "0", "--csv", str(path)]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader(open(path)))
    assert [r["train_batch_size"] for r in rows] == ["2", "4"] and all(float(r["tokens_per_second"]) > 0 for r in rows)


def _fake_trials(monkeypatch, outcome):
    """Replace the trial processes: outcome(batch) -> (exit code, stderr); a fitting trial writes its JSON."""
    tried = []

    def fake_run(cmd, env=None, capture_output=True, text=True):
        batch = int(cmd[cmd.index("--train_batch_size") + 1])
        tried.append(batch)
        code, stderr = outcome(batch)
        if code == 0:
            result = {"oom": False, "tokens_per_second": 1000.0 * batch, "peak_memory_mb": 10.0 * batch,
                      "step_ms_median": 1.0, "device": "fake", "precision": "bf16", "flops_per_token": 1.0,
                      "mfu": 0.5}  # fmt: skip
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                json.dump(result, f)
        return subprocess.CompletedProcess(cmd, code, stdout="", stderr=stderr)

    monkeypatch.setattr(throughput_sweep.subprocess, "run", fake_run)
    return tried


SWEEP = ["gpt", "nano", "--device", "cpu", "--memory_budget_gb", "1000", "--steps", "1"]


@pytest.mark.parametrize(
    "error",
    [
        "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB",
    ],
)
def test_library_allocation_failures_near_the_limit_are_bisected_as_oom(tmp_path, monkeypatch, capsys, error):
    """Below the limit cuBLAS/cuDNN may fail to get a workspace before the caching allocator does: the
    sweep must treat that trial as out of memory and go on bisecting, not abort."""
    tried = _fake_trials(monkeypatch, lambda b: (0, "") if b <= 6 else (1, f"Traceback ...\n{error}\n"))
    assert main([*SWEEP, "--csv", str(tmp_path / "s.csv")]) == 0
    assert tried == [1, 2, 4, 8, 6, 7]
    out = capsys.readouterr().out
    assert "largest batch size that fits: 6 (7 ran out of memory)" in out
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["oom"] for r in rows] == ["False", "False", "False", "True", "False", "True"]


def test_a_sweep_that_fits_everything_names_the_cap(tmp_path, monkeypatch, capsys):
    _fake_trials(monkeypatch, lambda b: (0, ""))
    assert main([*SWEEP, "--max_batch_size", "8", "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "largest batch size tried: 8, the --max_batch_size cap" in out and "that fits: 8" not in out
    assert "cap" in largest_message(8, 8) and "cap" not in largest_message(7, 8)


def test_other_trial_failures_stop_the_sweep(tmp_path, monkeypatch, capsys):
    _fake_trials(monkeypatch, lambda b: (0, "") if b < 4 else (1, "RuntimeError: CUDA error: an illegal memory access"))
    with pytest.raises(SystemExit) as exit_info:
        main([*SWEEP, "--csv", str(tmp_path / "s.csv")])
    assert exit_info.value.code == 2
    assert "the trial at batch size 4 failed (exit 1): RuntimeError: CUDA error: an illegal memory access" in (
        capsys.readouterr().err
    )
