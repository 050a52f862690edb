"""Nonsensical settings stop with one line before any run folder exists, so the corrected command runs."""

import os

import pytest
import torch

from languini.projects.gpt import main as gpt_main
from languini.projects.lstm import main as lstm_main

TINY = ["--n_layers", "1", "--h_dim", "16", "--head_dim", "4", "--n_heads", "2", "--mlp_dim", "32", "--seq_len", "8",
        "--vocab_size", "256", "--train_batch_size", "4", "--eval_batch_size", "2", "--max_eval_steps", "1",
        "--logger_type", "none", "--no-progress_bar", "--device", "cpu"]  # fmt: skip


def run(main, data_root, run_dir, *extra):
    argv = ["nano", *TINY, "--data_root", data_root, "--dataset", "synth_256", "--run_dir", str(run_dir), *extra]
    try:
        return main.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "main, bad",
    [
        (gpt_main, ["--train_batch_size", "0"]),
        (gpt_main, ["--seq_len", "0"]),
        (gpt_main, ["--n_heads", "0"]),
        (gpt_main, ["--decay_steps", "0"]),
        (gpt_main, ["--warmup_steps", "-5"]),
        (gpt_main, ["--max_lr", "nan"]),
        (gpt_main, ["--adam_eps", "0"]),
        (gpt_main, ["--max_eval_steps", "0"]),
        (gpt_main, ["--beta2", "1.5"]),
        (gpt_main, ["--min_lr", "1", "--max_lr", "0.5"]),
        (gpt_main, ["--ckpt_every_minutes", "-1"]),
        (lstm_main, ["--block_length", "0"]),
        (lstm_main, ["--non_quasi", "--coupled"]),
    ],
)
def test_bad_setting_fails_before_the_run_folder_exists(synthetic_corpus, tmp_path, capsys, main, bad):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert run(main, data_root, run_dir, *bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not os.path.exists(run_dir)
    assert run(main, data_root, run_dir, "--max_train_steps", "1", "--eval_every", "0") == 0  # the fix runs


def test_a_negative_step_count_is_named_as_typed(synthetic_corpus, tmp_path, capsys):
    """--max_train_steps alone also sets --decay_steps; the error must name the flag the user typed."""
    data_root, _ = synthetic_corpus
    assert run(gpt_main, data_root, tmp_path / "run", "--max_train_steps", "-5") == 2
    assert capsys.readouterr().err.strip() == "error: --max_train_steps must be at least 1, got -5"


def test_a_warm_up_as_long_as_the_schedule_is_warned_about(synthetic_corpus, tmp_path, capsys):
    data_root, _ = synthetic_corpus
    assert run(gpt_main, data_root, tmp_path / "run", "--max_train_steps", "2", "--eval_every", "0") == 0
    err = capsys.readouterr().err
    assert "warning: --warmup_steps 100 is not below --decay_steps 2" in err and "never reaches --max_lr" in err
    flags = ("--max_train_steps", "2", "--warmup_steps", "1", "--eval_every", "0", "--overwrite")
    assert run(gpt_main, data_root, tmp_path / "run", *flags) == 0
    assert "warmup" not in capsys.readouterr().err


def test_weights_that_become_nan_are_never_checkpointed(synthetic_corpus, tmp_path, monkeypatch, capsys):
    """The loss is computed before its update, so a finite loss can hide NaN weights: check them too."""
    data_root, _ = synthetic_corpus
    poison = torch.optim.Adam.step

    def step_then_poison(self, *args, **kwargs):
        out = poison(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] >= 4:  # the last update: its loss was finite
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    run_dir = tmp_path / "run"
    assert run(gpt_main, data_root, run_dir, "--max_train_steps", "2", "--decay_steps", "4", "--eval_every", "0") == 0
    before = os.path.getmtime(run_dir / "checkpoints" / "latest.pt")
    monkeypatch.setattr(torch.optim.Adam, "step", step_then_poison)
    code = run(
        gpt_main, data_root, run_dir, "--max_train_steps", "4", "--decay_steps", "4", "--resume", "auto", "--eval_every", "0"
    )
    assert code == 1 and "weights became NaN" in capsys.readouterr().err
    assert os.path.getmtime(run_dir / "checkpoints" / "latest.pt") == before
