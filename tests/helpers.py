"""Helpers shared by the tests (plain functions; the fixtures are in conftest.py)."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from languini.dataset_lib.layout import END_OF_DOC, write_file_list, write_token_file
from languini.projects import load_project
from languini.train_lib.checkpoint import load_checkpoint
from languini.train_lib.loggers import read_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT_MAIN = os.path.join(REPO_ROOT, "languini", "projects", "gpt", "main.py")


def load_benchmark(name):
    """The script benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
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


def torchrun(script, argv=(), nproc=2, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc script *argv` from the repository root, one thread per
    process, output captured. A crash dumps every thread's Python stack (faulthandler) and a C++ error its
    stack, so that a rare failure on CI says where it happened."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1",
           **(env or {})}  # fmt: skip
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=timeout)  # fmt: skip


def check_two_processes_equal_accumulation(main_py, run_main, make_args, tmp_path, extra=(), tol=1e-5):
    """2 gloo processes x 1 micro-step and 1 process x 2 micro-steps, 10 steps each from
    `make_args(run_dir, steps, *flags)`: the same losses (within `tol`) and gradient norms (relative `tol`;
    Adam hides a gradient scale error from the losses, the norms do not). Returns the two run folders."""
    ddp_dir, acc_dir = tmp_path / "ddp", tmp_path / "acc"
    grads = [*extra, "--log_grads_every", "1"]
    result = torchrun(main_py, make_args(ddp_dir, 10, *grads))
    assert result.returncode == 0, output_tail(result)
    assert run_main(make_args(acc_dir, 10, "--gradient_accumulation_steps", "2", *grads)) == 0

    ddp, acc = train_losses(ddp_dir), train_losses(acc_dir)
    assert sorted(ddp) == sorted(acc) == list(range(1, 11))
    np.testing.assert_allclose([ddp[s] for s in ddp], [acc[s] for s in ddp], rtol=0, atol=tol)
    ddp_norms = [r["grad/norm"] for r in read_metrics(ddp_dir)]
    acc_norms = [r["grad/norm"] for r in read_metrics(acc_dir)]
    assert len(ddp_norms) == 10
    np.testing.assert_allclose(ddp_norms, acc_norms, rtol=tol)
    return ddp_dir, acc_dir


def single_error_line(err: str) -> str:
    """`err` is exactly one `error: ...` line (warnings before it allowed) and no traceback; returns it."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def output_tail(proc: subprocess.CompletedProcess, chars=3000) -> str:
    """The end of a finished command's stdout and stderr, for an assertion's message."""
    return f"--- stdout:\n{proc.stdout[-chars:]}\n--- stderr:\n{proc.stderr[-chars:]}"


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


def first_and_last_losses(run_dir) -> tuple[float, float]:
    """Mean training loss of the first three steps and of the last three steps of a run."""
    losses = train_losses(run_dir)
    last = max(losses)
    return float(np.mean([losses[s] for s in (1, 2, 3)])), float(np.mean([losses[s] for s in range(last - 2, last + 1)]))


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


def _rank_entry(rank, world_size, store_path, fn, args, results):
    import torch.distributed as dist

    from languini.train_lib.distributed import World

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        results.put((rank, fn(World(rank=rank, local_rank=rank, size=world_size), *args)))
    except BaseException as e:  # reported to the test, which fails with the rank's error
        results.put((rank, e))
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, *args, world_size=2, timeout=120):
    """Run `fn(world, *args)` in `world_size` fresh processes joined by a gloo group; returns the results
    by rank (a rank's exception is raised here). `fn` and its results must be picklable (a module-level
    function of a test module)."""
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        procs = [
            context.Process(target=_rank_entry, args=(rank, world_size, store, fn, args, results))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            by_rank = dict(results.get(timeout=timeout) for _ in procs)
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    for rank in sorted(by_rank):
        if isinstance(by_rank[rank], BaseException):
            raise AssertionError(f"rank {rank} failed: {by_rank[rank]!r}") from by_rank[rank]
    return [by_rank[rank] for rank in range(world_size)]


PAUSING_TRAINER = """
import dataclasses, sys, time
from languini.projects import load_project
from languini.train_lib.train_command import run_training

project, pause_at = sys.argv[1], int(sys.argv[2])
spec = load_project(project)

class Pausing(spec.Model):
    calls = 0
    def forward(self, x, state=None):
        Pausing.calls += 1
        if Pausing.calls == pause_at:
            print("PAUSED", flush=True)
            time.sleep(600)
        return super().forward(x, state)

sys.exit(run_training(dataclasses.replace(spec, Model=Pausing), sys.argv[3:]))
"""


def pausing_trainer_command(project: str, pause_at_forward: int, args) -> list[str]:
    """A command that trains `project` with `args` and, at its `pause_at_forward`-th forward pass, prints
    PAUSED and sleeps (for `sigkill_once_paused`): with one micro-step and no validation, forward pass n is
    step n."""
    return [sys.executable, "-c", PAUSING_TRAINER, project, str(pause_at_forward), *map(str, args)]


def check_stateful_sigkill_resume(project, run_main, make_args, data_root, tmp_path, *extra) -> dict:
    """A stateful model killed by SIGKILL inside step 11 (8 steps checkpointed, 2 micro-steps per step)
    resumes to the run it would have been: the same losses bit for bit, the same final weights and the
    same carried states. `make_args(data_root, run_dir, steps, *flags)` builds the trainer's arguments.
    Returns the checkpoint the kill left, for the caller's checks of its states."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = [*extra, "--gradient_accumulation_steps", "2"]
    assert run_main(make_args(data_root, straight, 16, *extra)) == 0

    args = make_args(data_root, killed, 16, *extra, "--log_ckpt_every", "8")
    sigkill_once_paused(pausing_trainer_command(project, 21, args))  # forward 21: inside step 11
    assert max(train_losses(killed)) == 10
    checkpoint = load_checkpoint(str(killed / "checkpoints" / "latest.pt"))
    assert checkpoint["step"] == 8

    assert run_main(args + ["--resume", "auto"]) == 0
    resumed, expected = train_losses(killed), train_losses(straight)
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == expected  # bit-identical, not approximately equal
    end_resumed = load_checkpoint(str(killed / "checkpoints" / "latest.pt"))
    end_straight = load_checkpoint(str(straight / "checkpoints" / "latest.pt"))
    for micro_a, micro_b in zip(end_resumed["states"][0], end_straight["states"][0]):
        for layer_a, layer_b in zip(micro_a, micro_b):
            for a, b in zip(layer_a, layer_b):
                assert torch.equal(a, b)
    for name, weight in end_straight["model"].items():
        assert torch.equal(end_resumed["model"][name], weight), name
    return checkpoint
