"""benchmarks/baselines.py: each model gets the steps of the FLOP budget, trains, is evaluated with its
project's protocol, and lands in the table (a dash where the corpus has no character counts)."""

import json
import os

from helpers import load_benchmark, make_synthetic_corpus

from languini.projects import load_project
from languini.tools.compute_classes import steps_for_flops
from languini.tools.flops import count_step_flops


def test_each_model_trains_for_its_budget_and_is_evaluated_with_its_protocol(tmp_path, capsys):
    make_synthetic_corpus(str(tmp_path / "data"))
    doc = tmp_path / "table.md"
    argv = ["--flops", "2e10", "--data_root", str(tmp_path / "data"), "--dataset", "synth_256",
            "--out", str(tmp_path / "runs"), "--train_batch_size", "4", "--eval_streams", "2",
            "--only", "GPT", "quasi-LSTM", "--doc", str(doc)]  # fmt: skip
    assert load_benchmark("baselines").main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index('{\n  "flops"') :])["rows"]
    assert [r["model"] for r in rows] == ["GPT", "quasi-LSTM"]
    for row in rows:
        spec = load_project(row["project"])
        cfg = spec.parse_config(["nano", "--train_batch_size", "4"], "check")
        per_token = count_step_flops(row["project"], cfg).forward_backward_per_token
        assert row["flops_per_token"] == per_token
        assert row["steps"] == steps_for_flops(2e10, per_token, 4, cfg.seq_len) > 0
        with open(os.path.join(row["run_dir"], "eval", "test.json")) as f:
            result = json.load(f)
        assert result["checkpoint_step"] == row["steps"] and result["protocol"] == row["protocol"]
    assert [r["protocol"] for r in rows] == ["sliding_window", "stateful"] and rows[1]["eval_streams"] == 2
    table = doc.read_text()
    assert "| GPT | 1,461,760 |" in table and "| stateful, 2 streams |" in table and "| – | – |" in table
