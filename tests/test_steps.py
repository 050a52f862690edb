"""Compute classes: steps from hours, the published recipes, and the `languini steps` command."""

import json
import os

import pytest
from helpers import preset_config

from languini.cli import main as languini_main
from languini.tools import compute_classes, steps
from languini.tools.compute_classes import RECIPES, reference_tokens_per_second, steps_for
from languini.tools.flops import count_step_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r['project']}-{r['hours']}h-{r['preset']}")
def test_reference_table_reproduces_every_published_recipe(recipe):
    tps = reference_tokens_per_second(recipe["project"], recipe["preset"])
    assert steps_for(recipe["hours"], tps, recipe["train_batch_size"], 512) == recipe["steps"]
    assert recipe["train_batch_size"] % recipe["gradient_accumulation_steps"] == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r['project']}-{r['hours']}h-{r['preset']}")
def test_steps_command_prints_each_recipe(recipe, capsys):
    argv = ["steps", recipe["project"], recipe["preset"], "--hours", str(recipe["hours"]),
            "--train_batch_size", str(recipe["train_batch_size"])]  # fmt: skip
    assert languini_main(argv) == 0
    out = capsys.readouterr().out
    assert f"--max_train_steps {recipe['steps']} --decay_steps {recipe['steps']}" in out
    assert compute_classes.recipe_command(recipe) in out


def test_recipe_command_holds_the_exact_flags():
    cmd = compute_classes.recipe_command(RECIPES[3])
    for flag in ["main.py medium", "--train_batch_size 256", "--gradient_accumulation_steps 32",
                 "--max_train_steps 21908", "--decay_steps 21908", "--tokens_per_second 16618"]:  # fmt: skip
        assert flag in cmd


def test_steps_without_hours_lists_every_class(capsys):
    assert steps.main(["gpt", "small", "--train_batch_size", "128"]) == 0
    out = capsys.readouterr().out
    assert "6h: 18265 steps" in out and "12h: 36529 steps" in out and "96h:" in out


def test_tokens_per_second_and_throughput_json(tmp_path, capsys):
    assert steps.main(["gpt", "nano", "--hours", "1", "--tokens_per_second", "1000"]) == 0
    assert "1h: 1758 steps" in capsys.readouterr().out  # 3600 * 1000 / (16 * 128) = 1757.8
    path = tmp_path / "tp.json"
    path.write_text(json.dumps({"tokens_per_second": 2000.0}))
    assert steps.main(["gpt", "nano", "--hours", "1", "--throughput_json", str(path)]) == 0
    assert "1h: 3516 steps" in capsys.readouterr().out


def test_flop_budget_is_a_hardware_independent_class(capsys):
    assert steps.main(["gpt", "nano", "--flops", "1e15", "--train_batch_size", "8"]) == 0
    per_token = count_step_flops("gpt", preset_config("gpt", "nano")).forward_backward_per_token
    expected = round(1e15 / (per_token * 8 * 128))
    assert f"-> {expected} steps" in capsys.readouterr().out


def test_calibrate_scales_the_reference_by_the_measured_ratio(monkeypatch, capsys):
    def fake_measure(project, cfg, steps=0, warmup=-1):  # local throughput: proportional to 1 / h_dim
        return {"tokens_per_second": 1e6 / cfg.h_dim, "device": "fake GPU"}

    monkeypatch.setattr(steps, "measure", fake_measure)
    argv = ["gpt", "small", "--h_dim", "1536", "--hours", "6", "--train_batch_size", "128", "--calibrate"]
    assert steps.main(argv) == 0
    out = capsys.readouterr().out
    estimate = 55_416 * 768 / 1536  # the small reference, halved
    assert f"tokens_per_second {estimate:,.0f}" in out and "assumes the ratio" in out
    assert f"6h: {steps_for(6, estimate, 128, 512)} steps" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gpz", "small"], "unknown project 'gpz'"),
        (["gpt", "smal"], "unknown preset 'smal'"),
        (["gpt", "XL", "--hours", "6"], "no published RTX 3090 throughput"),
        (["gpt", "small", "--h_dim", "666"], "modified h_dim"),
        (["gpt", "small", "--hours", "x"], "--hours expects float"),
        (["gpt", "small", "--hours", "-1"], "--hours must be a finite number > 0, got -1.0"),
        (["gpt", "small", "--hours", "inf"], "--hours must be a finite number > 0, got inf"),
        (["gpt", "small", "--flops", "nan"], "--flops must be a finite number > 0, got nan"),
        (["gpt", "small", "--hours", "0"], "--hours must be a finite number > 0"),
        (["gpt", "small", "--hours", "6", "--tokens_per_second", "-5"], "--tokens_per_second must be a finite"),
        (["gpt", "small", "--hours", "6", "--flops", "1e18"], "pass --hours or --flops, not both"),
        (["gpt", "small", "--hours", "1e300"], "too large a budget"),
        (["gpt", "small", "--flops", "1e3"], "less than one training step"),
        (["gpt", "small", "--hour", "6"], "did you mean '--hours'?"),
        (["gpt", "nano", "--flops", "1e12", "--seq_len", "-1"], "--seq_len must be at least 1"),
        (["gpt", "small", "--hours", "6", "--throughput_json", __file__], "cannot read"),
    ],
)
def test_mistakes_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        steps.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r['project']}-{r['hours']}h-{r['preset']}")
def test_docs_hold_each_recipe_command(recipe):
    docs = "languini/projects/gpt/README.md" if recipe["project"] == "gpt" else "docs/compute_classes.md"
    text = open(os.path.join(REPO, docs)).read()
    assert compute_classes.recipe_command(recipe) in text


def test_lstm_steps_accept_the_coupled_variant_the_figures_were_measured_on(capsys):
    for extra in ([], ["--coupled"]):
        steps.main(["lstm", "small", "--hours", "24", "--train_batch_size", "84", *extra])
        assert "24h: 22385 steps" in capsys.readouterr().out


def test_throughput_json_of_another_config_is_refused(tmp_path, capsys):
    path = tmp_path / "nano.json"
    path.write_text(json.dumps({"project": "gpt", "preset": "nano", "seq_len": 128, "tokens_per_second": 1e4}))
    with pytest.raises(SystemExit) as exit_info:
        steps.main(["gpt", "small", "--hours", "6", "--throughput_json", str(path)])
    assert exit_info.value.code == 2
    assert "measured another config: preset nano (not small), seq_len 128 (not 512)" in capsys.readouterr().err


def test_suggested_flags_repeat_the_config_the_steps_hold_for(capsys):
    """The steps of a FLOP budget depend on the batch: the printed flags must carry the batch given."""
    assert steps.main(["gpt", "nano", "--flops", "3e11", "--train_batch_size", "8"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("--max_train_steps ") and last.endswith(" --train_batch_size 8"), last
