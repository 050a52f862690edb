"""The batch-size sweep: its search on a fake out-of-memory oracle, the CSV, and its errors."""

import csv
import math

import pytest
import torch
from helpers import preset_config

from languini.common_lib.errors import UserError
from languini.tools.throughput_sweep import (
    append_rows,
    csv_columns,
    find_largest_fitting,
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


def test_cpu_sweep_needs_a_memory_budget(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpt", "nano", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--memory_budget_gb" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_sweep_end_to_end(tmp_path):
    path = tmp_path / "sweep.csv"
    argv = ["gpt", "nano", "--device", "cpu", "--seq_len", "32", "--memory_budget_gb", "64", "--start_batch_size", "2",
            "--max_batch_size", "4", "--steps", "1", "--warmup", "0", "--csv", str(path)]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader(open(path)))
    assert [r["train_batch_size"] for r in rows] == ["2", "4"] and all(float(r["tokens_per_second"]) > 0 for r in rows)
