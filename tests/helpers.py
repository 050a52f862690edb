"""Helpers shared by the tests (plain functions; the fixtures are in conftest.py)."""

import os
import signal
import subprocess
import time

import numpy as np

from languini.dataset_lib.layout import END_OF_DOC, write_file_list, write_token_file
from languini.projects import load_project
from languini.train_lib.loggers import read_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")


def preset_config(project: str, preset: str = "nano"):
    """A project's preset config, as its main.py would build it."""
    return load_project(project).preset_config(preset)


# Per project: the model flags of the tiny runs (a 1-layer model of width 32 on the vocab-256 corpus).
TINY_MODEL_FLAGS = {
    "gpt": ["--n_layers", "1", "--h_dim", "32", "--head_dim", "8", "--n_heads", "2", "--mlp_dim", "64", "--seq_len", "16"],
    "lstm": [
        "--n_layers", "1", "--h_dim", "32", "--head_dim", "8", "--n_heads", "2", "--mlp_dim", "64",
        "--block_length", "4", "--seq_len", "10",
    ],
}  # fmt: skip


def tiny_run_args(project, data_root, run_dir, steps=10, *extra):
    """`nano` shrunk to a 1-layer model of width 32 on the vocab-256 synthetic corpus (`synth_256`), metrics
    every step, no validation, no extra sinks; `extra` flags come last. Projects without their own entry
    in TINY_MODEL_FLAGS train their nano model."""
    return [
        "nano", "--data_root", str(data_root), "--dataset", "synth_256", "--vocab_size", "256",
        *TINY_MODEL_FLAGS.get(project, []), "--train_batch_size", "4", "--eval_batch_size", "4",
        "--max_eval_steps", "2", "--max_train_steps", str(steps), "--decay_steps", "100", "--warmup_steps", "5",
        "--max_lr", "3e-3", "--log_metrics_every", "1", "--log_terminal_every", "1000", "--log_grads_every", "0",
        "--log_ckpt_every", "1000", "--eval_every", "0", "--logger_type", "none", "--no-progress_bar",
        "--device", "cpu", "--run_dir", str(run_dir), *extra,
    ]  # fmt: skip


def train_losses(run_dir) -> dict[int, float]:
    """{step: train loss} of a run folder's metrics; a step logged twice fails the test."""
    records = [r for r in read_metrics(run_dir) if "train/loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in records}


def exit_code(fn, *args) -> int:
    """`fn(*args)` of a command-line entry point, with SystemExit (a UserError's exit 2) as its code."""
    try:
        return fn(*args)
    except SystemExit as e:
        return e.code


def make_synthetic_corpus(data_root, dataset="synth_256", vocab_size=256, splits=None, seed=0):
    """Write a corpus of random books: `splits` maps split name -> list of book lengths.

    Tokens avoid the special ids 0..2 so padding and `<D>` are easy to spot. Returns the dataset folder.
    """
    splits = splits or {"train": [300, 120, 500, 260, 410, 90, 330, 200], "test": [150, 260, 90]}
    rng = np.random.default_rng(seed)
    dataset_path = os.path.join(data_root, dataset)
    for split, lengths in splits.items():
        rows = []
        for i, n in enumerate(lengths):
            rel = f"files/{split}_{i:04d}.npy"
            write_token_file(os.path.join(dataset_path, rel), rng.integers(END_OF_DOC + 1, vocab_size, n), vocab_size)
            rows.append((rel, n))
        write_file_list(data_root, split, rows)
    return dataset_path


def write_bigram_corpus(data_root):
    """Books that walk one fixed permutation of the vocabulary: a deterministic bigram to learn."""
    rng = np.random.default_rng(0)
    successor = np.full(256, 3)
    cycle = rng.permutation(np.arange(3, 256))
    successor[cycle] = np.roll(cycle, -1)
    rows = []
    for i in range(8):
        tokens = [int(rng.integers(3, 256))]
        for _ in range(599):
            tokens.append(successor[tokens[-1]])
        rel = f"files/book_{i}.npy"
        write_token_file(str(data_root / "synth_256" / rel), np.array(tokens), 256)
        rows.append((rel, len(tokens)))
    for split in ("train", "test"):
        write_file_list(str(data_root), split, rows)


def nano_demo_args(data_root, run_dir, *extra):
    """`nano` for 100 steps on the demo corpus with a fast schedule, validated once at the end."""
    return [
        "nano", *extra, "--data_root", str(data_root), "--max_train_steps", "100", "--decay_steps", "100",
        "--warmup_steps", "10", "--max_lr", "3e-3", "--eval_every", "100", "--max_eval_steps", "4",
        "--log_metrics_every", "1", "--logger_type", "none", "--no-progress_bar", "--device", "cpu",
        "--run_dir", str(run_dir),
    ]  # fmt: skip


def sigkill_once_paused(command, timeout=120):
    """Run `command`, wait for it to print PAUSED, then SIGKILL it: a crash, not a clean exit."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.stdout.readline().strip() != "PAUSED":
            assert proc.poll() is None, "the training process ended before pausing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
