"""benchmarks/gpu.sh --dry-run: the device benchmark's pipeline, on CPU with nano and tiny step counts."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu.sh")


def _dry_run(tmp_path, runs=None):
    env = dict(os.environ, LANGUINI_BENCH_OUT=str(tmp_path))
    if runs:
        env["LANGUINI_BENCH_RUNS"] = runs
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result_file,) = tmp_path.glob("*-dry-run.json")
    return json.loads(result_file.read_text())


def test_dry_run_writes_the_device_json(tmp_path):
    summary = _dry_run(tmp_path, runs="gpt nano 2")
    assert summary["dry_run"] is True and summary["device"].startswith("CPU") and summary["torch_version"]
    (row,) = summary["results"]
    assert row["project"] == "gpt" and row["train_batch_size"] == 2
    assert row["tokens_per_second"] > 0 and row["flops_per_token"] > 0 and "mfu" in row


@pytest.mark.slow
def test_dry_run_covers_both_projects(tmp_path):
    summary = _dry_run(tmp_path)
    assert [r["project"] for r in summary["results"]] == ["gpt", "lstm"]
    assert all(r["tokens_per_second"] > 0 for r in summary["results"])


def test_unknown_option_is_refused():
    proc = subprocess.run(["bash", SCRIPT, "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
