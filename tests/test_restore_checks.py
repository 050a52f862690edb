"""Resuming from a damaged or crafted checkpoint, and stopping during a validation.

Threats: an optimiser state whose tensors do not fit their parameters (torch's fused Adam then writes past
them: heap corruption), or that is empty, foreign or misnumbered; a schedule, loader position, step or
config that is not this run's, so that the run silently continues as another one (or "finishes" at once).
Each must end in one line with exit code 2. And a signal during a long validation must stop the run at
once, with a checkpoint at the step, instead of finishing the validation and one more step.
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    GPT_MAIN,
    REPO_ROOT,
    exit_code,
    make_synthetic_corpus,
    output_tail,
    single_error_line,
    tiny_run_args,
    torchrun,
    train_losses,
)

from languini.common_lib.errors import UserError
from languini.projects import load_project
from languini.projects.gpt import main as gpt_main
from languini.projects.gpt.model import Model as GPT
from languini.train_lib import checkpoint as ckpt
from languini.train_lib.loggers import read_metrics
from languini.train_lib.optim import build_optimizer
from languini.train_lib.train_command import run_training

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

STEPS = 3  # of the trained run; its checkpoints resume with STEPS + 2


def tiny_args(data_root, run_dir, steps, *extra):
    return tiny_run_args("gpt", data_root, run_dir, steps, *extra)


def run_main(argv) -> int:
    return exit_code(gpt_main.main, argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{optimizer: (data_root, run folder)} of tiny GPTs trained STEPS steps with Adam and with Muon."""
    root = tmp_path_factory.mktemp("trained")
    data_root = str(root / "synth")
    make_synthetic_corpus(data_root)
    runs = {}
    for optimizer in ("adam", "muon"):
        runs[optimizer] = (data_root, root / optimizer)
        assert run_main(tiny_args(data_root, root / optimizer, STEPS, "--optimizer", optimizer)) == 0
    return runs


def crafted(trained, tmp_path, change, optimizer="adam"):
    """A copy of the trained run whose checkpoint `change(checkpoint)` altered; (resume arguments, path)."""
    data_root, original = trained[optimizer]
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    path = run_dir / "checkpoints" / "latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    args = tiny_args(data_root, run_dir, STEPS + 2, "--optimizer", optimizer, "--resume", "auto")
    return args, str(path)


def first_state(checkpoint, optimizer="adam") -> dict:
    """The saved optimiser state of the first parameter (of Adam, or of Muon's matrices)."""
    state = checkpoint["optimizer"] if optimizer == "adam" else checkpoint["optimizer"]["muon"]
    return state["state"][min(state["state"])]


# ---- the optimiser state is checked before torch loads it --------------------------------------------------


def test_an_optimizer_buffer_of_another_size_is_refused_without_a_crash(trained, tmp_path):
    """Threat: fused Adam writing past a crafted 3-element exp_avg (heap corruption, a segfault). In a child
    process: without the check it is the process that crashes."""
    args, path = crafted(trained, tmp_path, lambda c: first_state(c).update(exp_avg=torch.zeros(3)))
    proc = subprocess.run([sys.executable, GPT_MAIN, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = single_error_line(proc.stderr)
    assert path in line and "exp_avg 3 float32" in line


def _flatten(state):
    state["exp_avg_sq"] = state["exp_avg_sq"].flatten()


def _no_group_params(checkpoint):
    checkpoint["optimizer"]["param_groups"][0]["params"].pop()


def _extra_group(checkpoint):
    groups = checkpoint["optimizer"]["param_groups"]
    groups.append({**groups[0], "params": []})


ADAM_DAMAGE = {
    "int64 buffer": (lambda c: first_state(c).update(exp_avg=first_state(c)["exp_avg"].long()), "int64"),
    "flattened buffer": (lambda c: _flatten(first_state(c)), "exp_avg_sq"),
    "step not a scalar": (lambda c: first_state(c).update(step=torch.zeros(3)), "step"),
    "missing buffer": (lambda c: first_state(c).pop("exp_avg"), "lacks exp_avg"),
    "unknown parameter": (lambda c: c["optimizer"]["state"].update({999: {}}), "parameter 999"),
    "empty state": (lambda c: c["optimizer"].update(state={}), f"empty after {STEPS} steps"),
    "parameter missing from its group": (_no_group_params, "parameters in group 0"),
    "extra group": (_extra_group, "2 parameter groups"),
    "lr not a number": (lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"), "lr"),
}


@pytest.mark.parametrize("damage", sorted(ADAM_DAMAGE))
def test_an_optimizer_state_that_does_not_fit_is_one_line(trained, tmp_path, capsys, damage):
    """Threat: a wrong dtype, shape, key or numbering that torch loads without a word, so the run continues
    with another optimiser state than the one it saved (or crashes in its first step)."""
    change, words = ADAM_DAMAGE[damage]
    args, path = crafted(trained, tmp_path, change)
    assert run_main(args) == 2
    line = single_error_line(capsys.readouterr().err)
    assert path in line and "optimizer state" in line and words in line


def test_muon_states_are_checked_and_a_good_one_resumes(trained, tmp_path, capsys):
    """Both optimisers of --optimizer muon are checked: Muon's momentum buffers too; the honest checkpoint
    still resumes."""

    def wrong_buffer(checkpoint):
        first_state(checkpoint, "muon")["momentum_buffer"] = torch.zeros(2, 2)

    args, path = crafted(trained, tmp_path, wrong_buffer, "muon")
    assert run_main(args) == 2
    line = single_error_line(capsys.readouterr().err)
    assert path in line and "Muon optimizer state" in line and "momentum_buffer 2x2" in line
    args, _ = crafted(trained, tmp_path / "good", lambda c: None, optimizer="muon")
    assert run_main(args) == 0


def test_a_plain_checkpoint_for_fsdp_is_checked_before_it_is_loaded(trained, tmp_path):
    """The FSDP path (a one-file checkpoint loaded into a sharded model) applies the same check first."""
    _, path = crafted(trained, tmp_path, lambda c: first_state(c).update(exp_avg=torch.zeros(3)))
    checkpoint = ckpt.load_checkpoint(path)
    cfg = load_project("gpt").parse_config(tiny_args("x", "y", STEPS), "main.py")
    model = GPT(cfg)
    with pytest.raises(UserError, match="exp_avg 3 float32"):
        ckpt.load_full_into_sharded(checkpoint, path, model, build_optimizer(model, cfg))


# ---- schedule, loader, step and config ------------------------------------------------------------------


def _loader_moved(checkpoint):
    checkpoint["loader"][0]["windows"] = -7
    checkpoint["loader"][0]["streams"] = []


def _stream_twice(checkpoint):
    checkpoint["loader"][0]["streams"][1] = [0, 0, 0]


RUN_DAMAGE = {
    "foreign schedule": (lambda c: c.update(scheduler={"foo": 1}), "schedule state lacks"),
    "schedule at another step": (lambda c: c["scheduler"].update(last_epoch=1), "state is at step 1"),
    "loader before the start": (_loader_moved, "loader state"),
    "loader without streams": (lambda c: c["loader"][0].update(streams=[]), "not of each of the 4 once"),
    "loader stream twice": (_stream_twice, "[0, 0, 2, 3], not"),
    "negative step": (lambda c: c.update(step=-5), "step -5"),
    "step past the run": (lambda c: c.update(step=10**6), "past --max_train_steps"),
    "config a list": (lambda c: c.update(config=[1]), "'config' entry is a list"),
}


@pytest.mark.parametrize("damage", sorted(RUN_DAMAGE))
def test_a_schedule_loader_step_or_config_of_another_run_is_one_line(trained, tmp_path, capsys, damage):
    """Threat: a foreign schedule restarting the learning rate, loader positions moving the data, a step that
    makes the run "finish" at once, a config that is not a dict ending in a traceback."""
    change, words = RUN_DAMAGE[damage]
    args, path = crafted(trained, tmp_path, change)
    assert run_main(args) == 2
    line = single_error_line(capsys.readouterr().err)
    assert path in line and words in line


def test_a_finished_run_resumed_at_its_last_step_is_done(trained, tmp_path, capsys):
    """The step bound keeps a run resumed at its final step what it was: done, without training."""
    args, _ = crafted(trained, tmp_path, lambda c: None)
    args[args.index("--max_train_steps") + 1] = str(STEPS)
    assert run_main(args) == 0
    assert f"done: {STEPS} steps" in capsys.readouterr().out


# ---- a signal during a validation ----------------------------------------------------------------------


class SignalInValidation(GPT):
    """Sends this process SIGTERM in its second validation forward pass (rank 0 only under torchrun)."""

    eval_calls = 0

    def forward(self, x, state=None):
        if not self.training:
            SignalInValidation.eval_calls += 1
            if SignalInValidation.eval_calls == 2 and os.environ.get("RANK", "0") == "0":
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x, state)


def test_a_signal_during_validation_abandons_it_and_checkpoints_the_step(synthetic_corpus, tmp_path, capsys):
    """Threat: a validation of many batches running to its end after SIGTERM, then one more step, then the
    checkpoint: long past a scheduler's grace period. It stops before its next batch, writes no validation
    record and checkpoints the step it validated."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    SignalInValidation.eval_calls = 0
    spec = dataclasses.replace(load_project("gpt"), Model=SignalInValidation)
    args = tiny_args(data_root, run_dir, 20, "--eval_every", "3", "--max_eval_steps", "-1")
    assert run_training(spec, args) == 128 + signal.SIGTERM
    assert SignalInValidation.eval_calls == 2  # the validation has 17 batches
    assert ckpt.load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))["step"] == 3
    assert max(train_losses(run_dir)) == 3
    assert not any("eval/loss" in r for r in read_metrics(run_dir))
    assert "stopped by SIGTERM after step 3" in capsys.readouterr().out


VALIDATION_SIGNAL_SCRIPT = """
import dataclasses, sys
sys.path.insert(0, sys.argv[1])
from test_restore_checks import SignalInValidation
from languini.common_lib.errors import exit_on_user_error
from languini.projects import load_project
from languini.train_lib.train_command import run_training

train = exit_on_user_error(run_training)
sys.exit(train(dataclasses.replace(load_project("gpt"), Model=SignalInValidation), sys.argv[2:]))
"""


def test_a_signal_on_one_rank_during_validation_stops_every_rank(synthetic_corpus, tmp_path):
    """Threat: under torchrun one rank abandoning a validation while the others wait in its collectives
    (a hang until torchrun kills them all). The ranks vote before every batch and stop together."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "ddp"
    script = tmp_path / "signal_in_validation.py"
    script.write_text(VALIDATION_SIGNAL_SCRIPT)
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # the script imports SignalInValidation from here
    args = tiny_args(data_root, run_dir, 20, "--eval_every", "3", "--max_eval_steps", "-1")
    proc = torchrun(script, [tests_dir, *args])
    assert "stopped by SIGTERM after step 3" in proc.stdout, output_tail(proc)
    checkpoint = ckpt.load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    assert checkpoint["step"] == 3 and [s["windows"] for s in checkpoint["loader"]] == [3, 3]
    assert not any("eval/loss" in r for r in read_metrics(run_dir))
