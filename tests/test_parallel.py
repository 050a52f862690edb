"""--parallel fsdp, --activation_checkpointing and resuming on another number of processes (CPU, gloo).

Reference everywhere: one process x 2 accumulation steps, which makes the same updates as 2 processes x 1
(DDP or FSDP) on the same global batch. Tiny 1-layer width-32 models, a few steps each; the combinations
that need more torchrun launches are marked slow.
"""

import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import (
    GPT_MAIN,
    REPO_ROOT,
    exit_code,
    load_benchmark,
    output_tail,
    tiny_run_args,
    torchrun,
    train_losses,
)

from languini.projects import load_project
from languini.projects.gpt import main as gpt_main
from languini.projects.lstm import main as lstm_main
from languini.tools import export
from languini.train_lib.checkpoint import load_checkpoint, load_model_weights

MAINS = {
    "gpt": (gpt_main, GPT_MAIN),
    "lstm": (lstm_main, os.path.join(REPO_ROOT, "languini", "projects", "lstm", "main.py")),
}
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def args(project, data_root, run_dir, steps, *extra):
    return tiny_run_args(project, data_root, run_dir, steps, *extra)


def one_process(project, argv) -> int:
    return exit_code(MAINS[project][0].main, argv)


def two_processes(project, argv, env=None) -> subprocess.CompletedProcess:
    return torchrun(MAINS[project][1], argv, env=env)


def reference(project, data_root, tmp_path, steps=8) -> dict:
    """Losses of the uninterrupted run: one process x 2 accumulation steps."""
    run_dir = tmp_path / "reference"
    assert one_process(project, args(project, data_root, run_dir, steps, "--gradient_accumulation_steps", "2")) == 0
    return train_losses(run_dir)


def assert_same_losses(got: dict, expected: dict, tol=TOL):
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=0, atol=tol)


def resume_case(project, data_root, tmp_path, first: str, second: str, mode: str):
    """4 steps on `first` ("1": one process x 2 micro-steps, "2": two processes x 1), then on `second` to
    step 8; the losses equal the uninterrupted run's."""
    expected = reference(project, data_root, tmp_path)
    run_dir = tmp_path / "run"
    for n_proc, steps, resume in ((first, 4, []), (second, 8, ["--resume", "auto"])):
        argv = args(project, data_root, run_dir, steps, "--parallel", mode, *resume)
        if n_proc == "1":
            assert one_process(project, argv + ["--gradient_accumulation_steps", "2"]) == 0
        else:
            result = two_processes(project, argv)
            assert result.returncode == 0, output_tail(result)
    assert_same_losses(train_losses(run_dir), expected)
    return run_dir


# ---- FSDP == accumulation, and an FSDP checkpoint resumed on one process -------------------------------


@pytest.mark.parametrize("project", ["gpt", "lstm"])
def test_fsdp_equals_accumulation_and_resumes_on_one_process(synthetic_corpus, tmp_path, project):
    """2 FSDP processes for 4 steps, continued by 1 process to step 8: every loss within 1e-4 of 1 process x
    2 micro-steps; the sharded checkpoint is a DCP folder that also loads for evaluation."""
    data_root, _ = synthetic_corpus
    expected = reference(project, data_root, tmp_path)
    run_dir = tmp_path / "fsdp"
    result = two_processes(project, args(project, data_root, run_dir, 4, "--parallel", "fsdp", "--log_grads_every", "2"))
    assert result.returncode == 0, output_tail(result)
    latest = run_dir / "checkpoints" / "latest.pt"
    checkpoint = load_checkpoint(str(latest))
    assert checkpoint["model"] == {} and checkpoint["world_size"] == 2
    assert (run_dir / "checkpoints" / checkpoint["sharded"] / ".metadata").is_file()
    spec = load_project(project)
    cfg = spec.parse_config(args(project, data_root, run_dir, 4), "main.py")
    model = spec.Model(cfg)
    load_model_weights(model, str(latest))  # eval.py / sample read a sharded checkpoint too
    assert all(torch.isfinite(p).all() for p in model.parameters())
    bundle = export.export_run(str(run_dir), str(tmp_path / "bundle"))  # and so does export
    assert export.verify_main([bundle]) == 0

    assert one_process(project, args(project, data_root, run_dir, 8, "--resume", "auto", "--parallel", "fsdp")) == 0
    assert_same_losses(train_losses(run_dir), expected)
    assert load_checkpoint(str(latest))["sharded"] is None  # one process writes the plain format
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.endswith(".dcp")] == []  # the old folder went


@pytest.mark.slow
@pytest.mark.parametrize("project", ["gpt", "lstm"])
def test_fsdp_eight_steps_equal_accumulation(synthetic_corpus, tmp_path, project):
    data_root, _ = synthetic_corpus
    expected = reference(project, data_root, tmp_path)
    run_dir = tmp_path / "fsdp"
    result = two_processes(project, args(project, data_root, run_dir, 8, "--parallel", "fsdp", "--log_ckpt_every", "3"))
    assert result.returncode == 0, output_tail(result)
    assert_same_losses(train_losses(run_dir), expected)


# ---- resume across world sizes --------------------------------------------------------------------------


def test_ddp_resume_one_to_two_processes_with_states(synthetic_corpus, tmp_path):
    """quasi-LSTM: 1 process x 2 micro-steps, then 2 DDP processes x 1: each stream keeps its state."""
    data_root, _ = synthetic_corpus
    resume_case("lstm", data_root, tmp_path, "1", "2", "ddp")


def test_accumulation_steps_may_change_on_resume(synthetic_corpus, tmp_path):
    """One process: 2 micro-steps, then 4 (the same global batch): same losses as the uninterrupted run."""
    data_root, _ = synthetic_corpus
    expected = reference("lstm", data_root, tmp_path)
    run_dir = tmp_path / "run"
    assert one_process("lstm", args("lstm", data_root, run_dir, 4, "--gradient_accumulation_steps", "2")) == 0
    resumed = args("lstm", data_root, run_dir, 8, "--gradient_accumulation_steps", "4", "--resume", "auto")
    assert one_process("lstm", resumed) == 0
    assert_same_losses(train_losses(run_dir), expected)


def test_another_global_batch_is_refused_in_one_line(synthetic_corpus, tmp_path, capsys):
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert one_process("gpt", args("gpt", data_root, run_dir, 2)) == 0
    capsys.readouterr()
    assert one_process("gpt", args("gpt", data_root, run_dir, 4, "--train_batch_size", "8", "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_batch_size" in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("project", ["gpt", "lstm"])
@pytest.mark.parametrize("mode,first,second", [("ddp", "2", "1"), ("fsdp", "1", "2"), ("ddp", "1", "2")])
def test_resume_across_world_sizes(synthetic_corpus, tmp_path, project, mode, first, second):
    data_root, _ = synthetic_corpus
    resume_case(project, data_root, tmp_path, first, second, mode)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_under_ddp_on_two_processes(synthetic_corpus, tmp_path):
    """A sharded checkpoint of 2 FSDP processes, continued by 2 DDP processes (DCP loads it whole)."""
    data_root, _ = synthetic_corpus
    expected = reference("lstm", data_root, tmp_path)
    run_dir = tmp_path / "run"
    for steps, mode, resume in ((4, "fsdp", []), (8, "ddp", ["--resume", "auto"])):
        result = two_processes("lstm", args("lstm", data_root, run_dir, steps, "--parallel", mode, *resume))
        assert result.returncode == 0, output_tail(result)
    assert_same_losses(train_losses(run_dir), expected)


# ---- a crash during a sharded save ----------------------------------------------------------------------


def test_sigkill_during_a_sharded_save_keeps_the_previous_checkpoint(synthetic_corpus, tmp_path):
    """Test hook: LANGUINI_TEST_KILL_BEFORE_POINTER_AT_STEP=4 makes rank 0 SIGKILL itself once the DCP folder
    of step 4 is complete but before latest.pt names it. latest.pt still names step 2's folder, which loads:
    the run resumes from step 2 (on one process) and matches the uninterrupted run."""
    data_root, _ = synthetic_corpus
    expected = reference("gpt", data_root, tmp_path, steps=6)
    run_dir = tmp_path / "run"
    argv = args("gpt", data_root, run_dir, 6, "--parallel", "fsdp", "--log_ckpt_every", "2")
    result = two_processes("gpt", argv, env={"LANGUINI_TEST_KILL_BEFORE_POINTER_AT_STEP": "4"})
    assert result.returncode != 0
    checkpoint = load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    assert checkpoint["step"] == 2
    folders = sorted(n for n in os.listdir(run_dir / "checkpoints") if n.endswith(".dcp"))
    assert len(folders) == 2 and folders[0].startswith("step_00000002.") and folders[1].startswith("step_00000004.")
    assert checkpoint["sharded"] == folders[0]

    assert one_process("gpt", argv + ["--resume", "auto"]) == 0
    assert_same_losses(train_losses(run_dir), expected)
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.endswith(".dcp")] == []  # stale folder removed


# ---- activation checkpointing ---------------------------------------------------------------------------


@pytest.mark.parametrize("project", ["gpt", "lstm"])
def test_activation_checkpointing_gives_the_same_losses(synthetic_corpus, tmp_path, project):
    data_root, _ = synthetic_corpus
    plain, checkpointed = tmp_path / "plain", tmp_path / "ac"
    extra = ["--gradient_accumulation_steps", "2"]
    assert one_process(project, args(project, data_root, plain, 6, *extra)) == 0
    assert one_process(project, args(project, data_root, checkpointed, 6, *extra, "--activation_checkpointing")) == 0
    assert_same_losses(train_losses(checkpointed), train_losses(plain), tol=1e-6)
    names = load_checkpoint(str(checkpointed / "checkpoints" / "latest.pt"))["model"]
    assert sorted(names) == sorted(load_checkpoint(str(plain / "checkpoints" / "latest.pt"))["model"])


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp(synthetic_corpus, tmp_path):
    data_root, _ = synthetic_corpus
    expected = reference("lstm", data_root, tmp_path, steps=4)
    run_dir = tmp_path / "run"
    result = two_processes("lstm", args("lstm", data_root, run_dir, 4, "--parallel", "fsdp", "--activation_checkpointing"))
    assert result.returncode == 0, output_tail(result)
    assert_same_losses(train_losses(run_dir), expected)


@pytest.mark.slow
def test_compile_under_fsdp(synthetic_corpus, tmp_path):
    """--compile default with FSDP (each block's forward compiled, FSDP hooks eager), when compile works here."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as e:  # no C compiler, ...
        pytest.skip(f"torch.compile does not work on this machine: {e}")
    data_root, _ = synthetic_corpus
    expected = reference("gpt", data_root, tmp_path, steps=3)
    run_dir = tmp_path / "run"
    result = two_processes("gpt", args("gpt", data_root, run_dir, 3, "--parallel", "fsdp", "--compile", "default"))
    assert result.returncode == 0, output_tail(result)
    assert_same_losses(train_losses(run_dir), expected, tol=1e-3)


# ---- memory ---------------------------------------------------------------------------------------------


def test_analytic_memory_matches_a_measured_step():
    """Parameters + gradients + Adam state of the real nano GPT after one step == the analytic figure (10%)."""
    from languini.train_lib.optim import build_optimizer

    memory = load_benchmark("memory")
    spec = load_project("gpt")
    cfg = spec.preset_config("nano")
    model = spec.Model(cfg)
    optimizer = build_optimizer(model, cfg)
    x = torch.randint(3, cfg.vocab_size, (1, 16))
    logits, _ = model(x)
    logits.float().mean().backward()
    optimizer.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    analytic = memory.bytes_per_process(sum(p.numel() for p in model.parameters()), "ddp", 1, "fp32")["total"]
    assert abs(measured - analytic) <= 0.1 * analytic, (measured, analytic)
