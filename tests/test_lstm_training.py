"""The LSTM project through the real trainer on CPU: states per (rank, micro-batch), exact resume, learning."""

import functools
import os

import pytest
import torch
from helpers import (
    REPO_ROOT,
    check_stateful_sigkill_resume,
    check_two_processes_equal_accumulation,
    exit_code,
    first_and_last_losses,
    nano_demo_args,
    tiny_run_args,
    write_bigram_corpus,
)

from languini.dataset_lib.languini_books import stream_indices
from languini.projects.lstm import main as lstm_main
from languini.train_lib.checkpoint import load_checkpoint
from languini.train_lib.loggers import read_metrics

LSTM_MAIN = os.path.join(REPO_ROOT, "languini", "projects", "lstm", "main.py")
CELLS = {"quasi": [], "classic": ["--non_quasi"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def tiny_args(data_root, run_dir, steps, *extra):
    return tiny_run_args("lstm", data_root, run_dir, steps, *extra)


def run_main(argv) -> int:
    return exit_code(lstm_main.main, argv)


def states_by_stream(checkpoint, global_batch: int, micro_batches: int) -> dict[int, list]:
    """Carried state of each global stream: {stream: [(c, h) per layer]} from a checkpoint's states."""
    world = len(checkpoint["states"])
    out = {}
    for rank, rank_states in enumerate(checkpoint["states"]):
        assert len(rank_states) == micro_batches  # one state per micro-batch, never shared
        streams = stream_indices(rank, world, global_batch)
        rows = len(streams) // micro_batches
        for m, state in enumerate(rank_states):
            for row, stream in enumerate(streams[m * rows : (m + 1) * rows]):
                out[stream] = [(c[row], h[row]) for c, h in state]
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_two_processes_equal_one_process_with_accumulation(synthetic_corpus, tmp_path, cell):
    """2 gloo ranks x 1 micro-step == 1 rank x 2 micro-steps: same losses and same carried state per stream."""
    data_root, _ = synthetic_corpus
    make_args = functools.partial(tiny_args, data_root)
    ddp_dir, acc_dir = check_two_processes_equal_accumulation(LSTM_MAIN, run_main, make_args, tmp_path, CELLS[cell])
    ddp_states = states_by_stream(load_checkpoint(str(ddp_dir / "checkpoints" / "latest.pt")), 4, 1)
    acc_states = states_by_stream(load_checkpoint(str(acc_dir / "checkpoints" / "latest.pt")), 4, 2)
    assert sorted(ddp_states) == sorted(acc_states) == [0, 1, 2, 3]
    for stream, layers in acc_states.items():
        for (c_acc, h_acc), (c_ddp, h_ddp) in zip(layers, ddp_states[stream]):
            assert c_acc.abs().max() > 0  # the state really was carried (not reset to zeros)
            torch.testing.assert_close(c_ddp, c_acc, rtol=0, atol=1e-5)
            torch.testing.assert_close(h_ddp, h_acc, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_resume_after_sigkill_is_bit_identical_including_states(synthetic_corpus, tmp_path, cell):
    checkpoint = check_stateful_sigkill_resume("lstm", run_main, tiny_args, synthetic_corpus[0], tmp_path, *CELLS[cell])
    assert any(t.abs().max() > 0 for micro in checkpoint["states"][0] for layer in micro for t in layer)


@pytest.mark.parametrize("cell", [*CELLS, "coupled"])
def test_loss_drops_on_learnable_corpus(tmp_path, cell):
    data_root = tmp_path / "bigram"
    write_bigram_corpus(data_root)
    run_dir = tmp_path / "run"
    cell_args = ["--coupled"] if cell == "coupled" else CELLS[cell]
    args = tiny_args(data_root, run_dir, 100, *cell_args, "--max_lr", "1e-2", "--seq_len", "16")
    assert run_main(args) == 0
    first, last = first_and_last_losses(run_dir)
    assert first > 5.0 and last < 0.5 * first, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_nano_learns_the_demo_corpus(tmp_path, cell, demo_data_root):
    """The nano preset on the demo corpus: loss drops clearly within 100 steps, validation included."""
    run_dir = tmp_path / "run"
    assert run_main(nano_demo_args(demo_data_root, run_dir, *CELLS[cell])) == 0
    first, last = first_and_last_losses(run_dir)
    assert last < first - 2.0, (first, last)
    final = read_metrics(run_dir)[-1]
    assert final["eval/loss"] < first - 1.5
