"""The trainer end to end on CPU with a tiny GPT: run folder, logging, resume, DDP == accumulation, errors."""

import dataclasses
import functools
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from helpers import (
    GPT_MAIN,
    check_two_processes_equal_accumulation,
    exit_code,
    first_and_last_losses,
    nano_demo_args,
    pausing_trainer_command,
    sigkill_once_paused,
    tiny_run_args,
    train_losses,
    write_bigram_corpus,
)

from languini.projects import load_project
from languini.projects.gpt import main as gpt_main
from languini.projects.gpt.model import Model as GPT
from languini.train_lib.checkpoint import load_checkpoint
from languini.train_lib.loggers import read_metrics
from languini.train_lib.optim import lr_at_step
from languini.train_lib.train_command import run_training

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def tiny_args(data_root, run_dir, steps=10, *extra):
    return tiny_run_args("gpt", data_root, run_dir, steps, *extra)


def run_main(argv) -> int:
    return exit_code(gpt_main.main, argv)


def test_run_folder_metrics_and_checkpoint(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    args = tiny_args(
        data_root, run_dir, 6, "--eval_every", "3", "--log_grads_every", "2", "--tokens_per_second", "1e4"
    )
    assert run_main(args) == 0

    for name in (
        "config.json",
        "env.json",
        "command.txt",
        "source.zip",
        "metrics.jsonl",
        "checkpoints/latest.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["h_dim"] == 32
    env = json.loads((run_dir / "env.json").read_text())
    assert {"git_revision", "torch_version", "device_name", "world_size", "hostname", "start_time"} <= set(
        env
    )
    assert "languini/train_lib/trainer.py" in zipfile.ZipFile(run_dir / "source.zip").namelist()

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens"] == r["step"] * 4 * 16 for r in records)
    assert records[0]["ref_gpu_hours"] == pytest.approx(64 / 1e4 / 3600)
    assert "grad/norm" in records[1] and "grad/norm" not in records[0]
    assert "eval/loss" in records[2] and "eval/loss" in records[5] and "eval/loss" not in records[3]
    assert [r["train/lr"] for r in records[:2]] == pytest.approx(
        [lr_at_step(s, 3e-3, 6e-6, 100, 5) for s in (0, 1)]
    )

    checkpoint = load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    assert checkpoint["step"] == 6
    saved_cfg = load_project("gpt").load_run_config(str(run_dir / "config.json"))
    assert set(checkpoint["model"]) == set(GPT(saved_cfg).state_dict())  # no module. / _orig_mod. prefixes
    for key in ("optimizer", "scheduler", "scaler", "loader", "states", "rng", "config"):
        assert key in checkpoint


def test_loss_drops_on_learnable_corpus(tmp_path):
    """Books that walk one fixed permutation of the vocabulary (a deterministic bigram): GPT must learn it."""
    data_root = tmp_path / "bigram"
    write_bigram_corpus(data_root)
    run_dir = tmp_path / "run"
    assert run_main(tiny_args(data_root, run_dir, 100, "--max_lr", "1e-2")) == 0
    first, last = first_and_last_losses(run_dir)
    assert first > 5.0 and last < 0.5 * first, (first, last)


def test_refuses_to_overwrite_another_run(synthetic_corpus, tmp_path, capsys):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert run_main(tiny_args(data_root, run_dir, 2)) == 0
    capsys.readouterr()
    assert run_main(tiny_args(data_root, run_dir, 2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--resume auto" in err
    assert run_main(tiny_args(data_root, run_dir, 3, "--overwrite")) == 0
    assert sorted(train_losses(run_dir)) == [1, 2, 3]


def test_missing_data_and_bad_batch_layout_give_one_line(tmp_path, synthetic_corpus, capsys):
    run_dir = tmp_path / "run"
    assert run_main(tiny_args(tmp_path / "nowhere", run_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "languini data prepare" in err
    data_root, _ = synthetic_corpus
    bad = tiny_args(data_root, run_dir, 2, "--train_batch_size", "6", "--gradient_accumulation_steps", "4")
    assert run_main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "divisible" in err
    (tmp_path / "synth" / "synth_256" / "meta.json").write_text(json.dumps({"vocab_size": 256}))
    assert run_main(tiny_args(data_root, run_dir, 2, "--vocab_size", "300")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocab_size 256" in err
    assert not run_dir.exists()  # nothing was written before the checks


class NaNAfterSevenSteps(GPT):
    """Returns NaN logits from the 7th training forward pass on (an injected divergence)."""

    def forward(self, x, state=None):
        logits, state = super().forward(x, state)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls >= 7:
                logits = logits * float("nan")
        return logits, state


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(synthetic_corpus, tmp_path, capsys):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    spec = dataclasses.replace(load_project("gpt"), Model=NaNAfterSevenSteps)
    code = run_training(spec, tiny_args(data_root, run_dir, 20, "--log_ckpt_every", "5"))
    assert code == 1
    assert "NaN or infinite at step 7" in capsys.readouterr().err
    checkpoint = load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    assert checkpoint["step"] == 5
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_resume_after_sigkill_is_bit_identical(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_main(tiny_args(data_root, straight, 20)) == 0

    # 10 steps checkpointed, 13 logged, then killed mid-step 14: not a clean exit
    args = tiny_args(data_root, killed, 20, "--log_ckpt_every", "10")
    sigkill_once_paused(pausing_trainer_command("gpt", 14, args))
    assert max(train_losses(killed)) == 13
    assert load_checkpoint(str(killed / "checkpoints" / "latest.pt"))["step"] == 10

    assert run_main(args + ["--resume", "auto", "--h_dim", "64"]) == 2  # a different model: refused
    assert run_main(args + ["--resume", "auto"]) == 0
    resumed, expected = train_losses(killed), train_losses(straight)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == expected  # bit-identical, not approximately equal


def test_ddp_two_processes_equal_one_process_with_accumulation(synthetic_corpus, tmp_path):
    """2 gloo processes x 1 micro-step == 1 process x 2 micro-steps (same global streams, same update)."""
    data_root, _ = synthetic_corpus
    make_args = functools.partial(tiny_args, data_root)
    ddp_dir, acc_dir = check_two_processes_equal_accumulation(GPT_MAIN, run_main, make_args, tmp_path)
    assert json.loads((ddp_dir / "env.json").read_text())["world_size"] == 2
    ddp_ckpt = load_checkpoint(str(ddp_dir / "checkpoints" / "latest.pt"))
    acc_ckpt = load_checkpoint(str(acc_dir / "checkpoints" / "latest.pt"))
    assert len(ddp_ckpt["loader"]) == 2
    for name, weight in acc_ckpt["model"].items():
        torch.testing.assert_close(ddp_ckpt["model"][name], weight, rtol=0, atol=1e-5)


def test_tensorboard_events_written(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert run_main(tiny_args(data_root, run_dir, 2, "--logger_type", "tb")) == 0
    events = [f for _, _, files in os.walk(run_dir / "tensorboard") for f in files if "tfevents" in f]
    assert events


def test_wandb_offline(synthetic_corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert run_main(tiny_args(data_root, run_dir, 2, "--logger_type", "wandb")) == 0
    runs = [d for _, dirs, _ in os.walk(run_dir / "wandb") for d in dirs if d.startswith("offline-run")]
    assert runs and (run_dir / "wandb_id.txt").read_text().strip() in runs[0]


@pytest.mark.slow
def test_compiled_training_checkpoint_has_clean_names(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert run_main(tiny_args(data_root, run_dir, 3, "--compile", "default")) == 0
    names = load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))["model"]
    assert not any("_orig_mod" in n or n.startswith("module.") for n in names)


def test_languini_train_runs_the_project_in_process(synthetic_corpus, tmp_path, capsys):
    from languini.tools import launch

    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert launch.train_main(["gpt", *tiny_args(data_root, run_dir, 2)]) == 0
    assert sorted(train_losses(run_dir)) == [1, 2]
    with pytest.raises(SystemExit) as exit_info:
        launch.train_main(["gpt", "nano", "--nproc_per_node", "2"])
    assert exit_info.value.code == 2 and "torchrun" in capsys.readouterr().err


def test_bf16_autocast_and_accumulation_run_on_cpu(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    args = tiny_args(data_root, run_dir, 3, "--precision", "bf16", "--gradient_accumulation_steps", "4")
    assert run_main(args) == 0
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))


@pytest.mark.slow
def test_nano_learns_the_demo_corpus(tmp_path, demo_data_root):
    """GPT nano on the demo corpus: the loss drops clearly within 100 steps, validation included."""
    run_dir = tmp_path / "run"
    assert run_main(nano_demo_args(demo_data_root, run_dir)) == 0
    first, last = first_and_last_losses(run_dir)
    assert last < first - 2.0, (first, last)
    final = read_metrics(run_dir)[-1]
    assert final["eval/loss"] < first - 1.5 and final["eval/normalised_ppl"] < 20
