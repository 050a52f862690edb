"""Training and evaluation runs against hostile files, interruptions and mistakes: each test names its threat.

Threats: a checkpoint that runs code when loaded, or a foreign file passed off as a checkpoint; `--overwrite`
deleting files the user put in the run folder; `--resume auto` silently starting over a run it cannot
continue (and deleting its metrics); two trainings writing into one run folder, or a killed one leaving a
stale lock; temporary files of interrupted writes piling up; Ctrl-C or a scheduler's SIGTERM losing the
steps since the last checkpoint (or breaking exact resume); a run resumed or evaluated on a different
corpus; abbreviated flags doing something other than intended, and `languini quickstart` replacing a
finished run; environment failures (full disk, read-only folder), damaged metrics, empty splits and
absurd settings ending in a traceback (or an out-of-memory kill) instead of one line.
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

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

from languini import quickstart
from languini.common_lib import atomic_io
from languini.common_lib.errors import UserError
from languini.common_lib.file_lock import LOCK_FILE
from languini.dataset_lib.layout import corpus_identity, read_file_list, write_file_list
from languini.projects.gpt import eval as gpt_eval
from languini.projects.gpt import main as gpt_main
from languini.report_lib import report
from languini.tools import new_project
from languini.train_lib import checkpoint as ckpt
from languini.train_lib import run_folder
from languini.train_lib.loggers import MetricsLogger, read_metrics
from languini.train_lib.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread



def tiny_args(data_root, run_dir, steps=4, *extra):
    return tiny_run_args("gpt", data_root, run_dir, steps, *extra)


def run_main(argv) -> int:
    return exit_code(gpt_main.main, argv)


def run_eval(argv) -> int:
    return exit_code(gpt_eval.main, [*argv, "--last_n", "16"])  # the tiny runs' seq_len


def one_error_line(capsys) -> str:
    """The captured stderr is exactly one `error: ...` line (warnings before it allowed), no traceback."""
    return single_error_line(capsys.readouterr().err)


def file_bytes(run_dir, *names) -> dict:
    return {name: (run_dir / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data_root, run folder) of a tiny GPT trained 2 steps once; tests work on a copy (`run`)."""
    root = tmp_path_factory.mktemp("trained")
    data_root = str(root / "synth")
    make_synthetic_corpus(data_root)
    assert run_main(tiny_args(data_root, root / "run", 2)) == 0
    return data_root, root / "run"


@pytest.fixture
def run(trained, tmp_path):
    """(data_root, run folder): a fresh copy of the trained run, on a fresh copy of its corpus."""
    data_root = str(tmp_path / "synth")
    shutil.copytree(trained[0], data_root)
    run_dir = tmp_path / "run"
    shutil.copytree(trained[1], run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "data_root": data_root, "run_dir": str(run_dir)}))
    return data_root, run_dir


# ---- 1. safe checkpoint loading ----------------------------------------------------------------------


class WritesMarker:
    """Unpickling this object calls open(path, "w"): it creates the marker file (stands in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(run, tmp_path, capsys):
    """Threat: a downloaded or planted checkpoint runs code when resumed or evaluated (pickle)."""
    data_root, run_dir = run
    marker = tmp_path / "MARKER"
    good = ckpt.load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    torch.save({**good, "payload": WritesMarker(marker)}, run_dir / "checkpoints" / "latest.pt")

    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 2
    assert "refusing to load" in one_error_line(capsys) and not marker.exists()
    evil = tmp_path / "evil.pt"
    shutil.copy(run_dir / "checkpoints" / "latest.pt", evil)
    assert run_eval(["--run_dir", str(run_dir), "--checkpoint", str(evil)]) == 2
    assert "refusing to load" in one_error_line(capsys) and not marker.exists()


def _foreign(kind: str, good: dict):
    model = dict(good["model"])
    if kind == "plain dict":
        return {"weights": torch.zeros(3), "note": "not a checkpoint"}
    if kind == "list":
        return [1, 2, 3]
    if kind == "missing parameter":
        model.pop(sorted(model)[0])
    if kind == "wrong shapes":
        name = next(k for k, v in model.items() if v.dim() == 2)
        model[name] = torch.zeros(model[name].shape[0] + 1, model[name].shape[1])
    return {**good, "model": model}


@pytest.mark.parametrize("kind", ["plain dict", "list", "missing parameter", "wrong shapes"])
def test_foreign_checkpoint_gives_one_line_on_resume_and_eval(run, tmp_path, capsys, kind):
    """Threat: a loadable file that is not this run's checkpoint ending in a KeyError / size-mismatch traceback."""
    data_root, run_dir = run
    path = run_dir / "checkpoints" / "latest.pt"
    torch.save(_foreign(kind, ckpt.load_checkpoint(str(path))), path)
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 2
    assert str(path) in one_error_line(capsys)
    assert run_eval(["--run_dir", str(run_dir)]) == 2
    assert str(path) in one_error_line(capsys)


def test_checkpoint_holds_only_tensors_and_plain_data(run):
    """Threat: a checkpoint format that needs unsafe loading (numpy or Python RNG objects) to be read."""
    checkpoint = torch.load(run[1] / "checkpoints" / "latest.pt", weights_only=True)  # no allow-listing
    assert {"corpus", "window", "rng"} <= set(checkpoint)
    assert isinstance(checkpoint["rng"][0]["numpy"]["keys"], torch.Tensor)


# ---- 2. --overwrite removes the run's files only --------------------------------------------------------


def test_overwrite_removes_the_runs_files_and_keeps_the_users(synthetic_corpus, tmp_path):
    """Threat: `--overwrite` deleting whole folders, with the user's files inside checkpoints/ or tensorboard/."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    assert run_main(tiny_args(data_root, run_dir, 2, "--logger_type", "tb")) == 0
    old_events = sorted(os.listdir(run_dir / "tensorboard"))
    assert old_events
    user_files = {
        "checkpoints/best_by_hand.pt": b"mine",
        "tensorboard/my_plot.png": b"png",
        "eval/notes.json": b'{"mine": true}',
        "NOTES.md": b"# my notes",
    }
    for name, data in user_files.items():
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).write_bytes(data)
    (run_dir / "eval" / "test.json").write_text(json.dumps({"split": "test", "protocol": "p", "checkpoint_step": 2}))

    assert run_main(tiny_args(data_root, run_dir, 3, "--logger_type", "tb", "--overwrite")) == 0
    for name, data in user_files.items():
        assert (run_dir / name).read_bytes() == data, name
    assert not (run_dir / "eval" / "test.json").exists()  # the replaced run's result
    assert not set(old_events) & set(os.listdir(run_dir / "tensorboard"))
    assert sorted(train_losses(run_dir)) == [1, 2, 3] and (run_dir / LOCK_FILE).exists()


def test_overwrite_removes_the_sharded_checkpoint_folders_and_nothing_else(tmp_path):
    """Threat: `--overwrite` leaving a replaced FSDP run's weights on disk, or following a link out of the run."""
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    sharded = run_dir / "checkpoints" / "step_00000004.0123456789ab.dcp"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(b"m")
    (sharded / "__0_0.distcp").write_bytes(b"w")
    (run_dir / "checkpoints" / "step_backup").mkdir()
    elsewhere.mkdir()
    (elsewhere / "kept").write_bytes(b"k")
    (run_dir / "checkpoints" / "step_00000008.0123456789ab.dcp").symlink_to(elsewhere)
    removed = run_folder.remove_run_files(str(run_dir))
    assert removed == [str(sharded)]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000008.0123456789ab.dcp", "step_backup"]
    assert (elsewhere / "kept").read_bytes() == b"k"


def test_files_named_like_a_runs_that_no_run_wrote_are_never_replaced(synthetic_corpus, tmp_path, capsys):
    """Threat: `--overwrite` on the user's own folder replacing their config.json and command.txt."""
    data_root, _ = synthetic_corpus
    mine = tmp_path / "myproject"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "command.txt").write_text("make all\n")
    before = file_bytes(mine, "config.json", "command.txt")
    for flags in ((), ("--overwrite",), ("--resume", "auto")):
        assert run_main(tiny_args(data_root, mine, 2, *flags)) == 2
        err = one_error_line(capsys)
        assert "config.json, command.txt" in err and "no run wrote" in err, err
        assert file_bytes(mine, *before) == before and not (mine / "checkpoints").exists()


def test_symlinked_checkpoints_folder_is_refused(run, tmp_path, capsys):
    """Threat: a run folder whose checkpoints/ links to another run's: --overwrite deleted that run's
    checkpoint and the new run wrote through the link (the lock covers one folder only)."""
    data_root, other = run
    before = (other / "checkpoints" / "latest.pt").read_bytes()
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(other / "checkpoints", linked / "checkpoints")
    for flags in ((), ("--overwrite",), ("--resume", "auto")):
        assert run_main(tiny_args(data_root, linked, 1, *flags)) == 2
        assert "checkpoints is a symbolic link" in one_error_line(capsys)
    assert (other / "checkpoints" / "latest.pt").read_bytes() == before


def test_exp_name_must_stay_below_the_projects_runs(synthetic_corpus, tmp_path, capsys, monkeypatch):
    """Threat: `--exp_name ../../x` (or an absolute path) writing, and with --overwrite deleting, outside runs/."""
    data_root, _ = synthetic_corpus
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("../../escaped", str(tmp_path / "abs"), "..", "a/../../b", "a//b"):
        args = [a for a in tiny_args(data_root, "unused", 1) if a not in ("--run_dir", "unused")]
        assert run_main([*args, "--exp_name", name]) == 2
        assert "--exp_name must name a folder below runs/<project>/" in one_error_line(capsys)
    assert os.listdir(work) == [] and not (tmp_path / "escaped").exists() and not (tmp_path / "abs").exists()
    assert run_main([*args, "--exp_name", "study/nested"]) == 0  # nested names stay below runs/<project>/
    assert (work / "runs" / "gpt" / "study" / "nested" / "checkpoints" / "latest.pt").is_file()


def test_hard_link_as_lock_file_is_refused_and_its_target_kept(run, tmp_path, capsys):
    """Threat: a hard link planted as .languini.lock: taking the lock truncates the file it names."""
    data_root, run_dir = run
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    os.unlink(run_dir / LOCK_FILE)
    os.link(precious, run_dir / LOCK_FILE)
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 2
    assert "not a lock file" in one_error_line(capsys)
    assert precious.read_text() == "keep me"


# ---- 3. --resume auto never starts over a run silently --------------------------------------------------


def test_resume_auto_without_a_checkpoint_refuses_and_changes_nothing(run, tmp_path, capsys):
    """Threat: `--resume auto` on a run killed before its first checkpoint wiping its metrics and starting over."""
    data_root, run_dir = run
    os.unlink(run_dir / "checkpoints" / "latest.pt")
    before = file_bytes(run_dir, "env.json", "command.txt", "metrics.jsonl", "config.json")
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 2
    err = one_error_line(capsys)
    assert "without a checkpoint" in err and "--overwrite" in err and "--run_dir" in err
    assert file_bytes(run_dir, *before) == before

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK_FILE).write_text("")  # a lock file left by an earlier attempt is not a run
    assert run_main(tiny_args(data_root, fresh, 2, "--resume", "auto")) == 0
    assert sorted(train_losses(fresh)) == [1, 2]


def test_resume_auto_starts_again_a_run_stopped_while_starting_up(run, capsys):
    """Threat: a scheduler's SIGTERM during start-up (run files written, no metrics, no checkpoint) leaving a
    folder the same requeued command refuses."""
    data_root, run_dir = run
    os.unlink(run_dir / "checkpoints" / "latest.pt")
    os.unlink(run_dir / "metrics.jsonl")
    (run_dir / "NOTES.md").write_text("mine")
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 0
    assert sorted(train_losses(run_dir)) == [1, 2, 3] and (run_dir / "NOTES.md").read_text() == "mine"
    env = json.loads((run_dir / "env.json").read_text())
    assert "resumes" not in env  # a fresh start, not a resume


def test_resume_without_config_json_is_refused_rather_than_unchecked(run, capsys):
    data_root, run_dir = run
    os.unlink(run_dir / "config.json")
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto", "--max_lr", "1")) == 2
    assert "has a checkpoint but no config.json" in one_error_line(capsys)


def test_resume_with_a_damaged_env_record_gives_one_line_and_a_missing_command_file_is_rewritten(run, capsys):
    data_root, run_dir = run
    env = (run_dir / "env.json").read_text()
    (run_dir / "env.json").write_text("[1, 2]")
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 2
    assert "env.json is damaged" in one_error_line(capsys)
    (run_dir / "env.json").write_text(env)
    os.unlink(run_dir / "command.txt")
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 0
    assert len((run_dir / "command.txt").read_text().splitlines()) == 1


# ---- 4. one training per run folder --------------------------------------------------------------------

PAUSING_TRAINER = """
import dataclasses, os, sys
from languini.common_lib.errors import exit_on_user_error
from languini.projects import load_project
from languini.projects.gpt import model
from languini.train_lib.train_command import run_training

class Pausing(model.Model):
    calls = 0
    def forward(self, x, state=None):
        if self.training:
            Pausing.calls += 1
            if Pausing.calls == int(os.environ["PAUSE_AT"]):
                print("PAUSED", flush=True)
                sys.stdin.readline()  # until the test writes a line (a signal handler runs meanwhile)
            if Pausing.calls == int(os.environ.get("SIGTERM_SELF_AT", 0)) and os.environ.get("RANK") == "0":
                os.kill(os.getpid(), 15)  # SIGTERM on rank 0 only
        return super().forward(x, state)

train = exit_on_user_error(run_training)
sys.exit(train(dataclasses.replace(load_project("gpt"), Model=Pausing), sys.argv[1:]))
"""


def start_paused(args, pause_at: int, stderr=None) -> subprocess.Popen:
    """A training process paused (blocked on its stdin) in the forward pass of step `pause_at`."""
    env = {**os.environ, "PAUSE_AT": str(pause_at), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING_TRAINER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=stderr, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    deadline = time.time() + 300
    while proc.stdout.readline().strip() != "PAUSED":
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the training process ended before pausing")
    return proc


def test_second_training_in_a_folder_is_refused_and_a_killed_one_leaves_no_lock(synthetic_corpus, tmp_path):
    """Threat: two trainings interleaving writes in one run folder; a SIGKILLed run blocking the folder for ever."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    args = tiny_args(data_root, run_dir, 6, "--log_ckpt_every", "2")
    holder = start_paused(args, pause_at=3)
    try:
        second = subprocess.run(
            [sys.executable, GPT_MAIN, *args, "--resume", "auto"], capture_output=True, text=True, cwd=REPO_ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == second.stderr.strip().splitlines()[0]
        assert f"run folder {run_dir} is in use by pid {holder.pid}" in second.stderr
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    assert run_main(args + ["--resume", "auto"]) == 0  # the OS released the lock with the process
    assert sorted(train_losses(run_dir)) == list(range(1, 7))


# ---- 5. stale temporary files ---------------------------------------------------------------------------


def test_stale_temp_files_of_the_runs_writes_are_removed_and_nothing_else(run):
    """Threat: half-written checkpoints (`.latest.pt.*.tmp`) left by kills filling the disk run after run."""
    data_root, run_dir = run
    stale = ["checkpoints/.latest.pt.k2j4_x9a.tmp", ".metrics.jsonl.ab12cd34.tmp", ".env.json.zz99qq11.tmp"]
    kept = ["checkpoints/.latest.pt.tmp", "checkpoints/.mine.pt.ab12cd34.tmp", ".notes.txt.ab12cd34.tmp"]
    for name in stale + kept:
        (run_dir / name).write_bytes(b"partial")
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 0
    assert not any((run_dir / name).exists() for name in stale)
    assert all((run_dir / name).read_bytes() == b"partial" for name in kept)


# ---- 6. signals and wall-clock checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(synthetic_corpus, tmp_path, sig, code):
    """Threat: Ctrl-C or a scheduler's SIGTERM losing every step since the last checkpoint, or breaking exact
    resume."""
    data_root, _ = synthetic_corpus
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = tiny_args(data_root, stopped, 20, "--log_metrics_every", "3")  # a report window open at the stop
    assert run_main(tiny_args(data_root, straight, 20, "--log_metrics_every", "3")) == 0

    proc = start_paused(args, pause_at=14)  # in step 14; the only step-cadence checkpoint is the last
    proc.send_signal(sig)
    out, _ = proc.communicate("\n", timeout=300)  # let step 14 finish
    assert proc.returncode == code
    assert ckpt.load_checkpoint(str(stopped / "checkpoints" / "latest.pt"))["step"] == 14
    assert f"--resume auto --run_dir {stopped}" in out
    assert max(train_losses(stopped)) == 12

    assert run_main(args + ["--resume", "auto"]) == 0
    resumed = train_losses(stopped)
    assert sorted(resumed) == [3, 6, 9, 12, 15, 18, 20]
    assert resumed == train_losses(straight)  # bit-identical, even the mean over steps 13-15 across the stop


KILLED_AFTER_SAVE = """
import os, signal, sys
from languini.common_lib.errors import exit_on_user_error
from languini.projects import load_project
from languini.train_lib import trainer
from languini.train_lib.train_command import run_training

save = trainer.Trainer.save
def save_then_die(self, path):
    save(self, path)
    if self.step == int(os.environ["KILL_AFTER_SAVE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
trainer.Trainer.save = save_then_die
sys.exit(exit_on_user_error(run_training)(load_project("gpt"), sys.argv[1:]))
"""


def test_a_crash_just_after_a_checkpoint_loses_no_metrics_line(synthetic_corpus, tmp_path):
    """Threat: a SIGKILL between a step's checkpoint and its metrics line; the resumed run starts after that
    step, so a line written after the checkpoint would never be written."""
    data_root, _ = synthetic_corpus
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    flags = ("--log_ckpt_every", "1", "--eval_every", "5", "--max_eval_steps", "1")
    assert run_main(tiny_args(data_root, straight, 8, *flags)) == 0
    args = tiny_args(data_root, killed, 8, *flags)
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_SAVE, *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "KILL_AFTER_SAVE_AT": "5"}, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, output_tail(proc)
    assert ckpt.load_checkpoint(str(killed / "checkpoints" / "latest.pt"))["step"] == 5

    assert run_main(args + ["--resume", "auto"]) == 0
    assert train_losses(killed) == train_losses(straight)  # steps 1-8 once each, the same losses
    evals = [(r["step"], r["eval/loss"]) for r in read_metrics(killed) if "eval/loss" in r]
    assert evals == [(r["step"], r["eval/loss"]) for r in read_metrics(straight) if "eval/loss" in r]
    assert [step for step, _ in evals] == [5, 8]


def test_a_second_ctrl_c_quits_at_once(synthetic_corpus, tmp_path):
    """Threat: a run that cannot be stopped while it finishes a long step or checkpoint."""
    data_root, _ = synthetic_corpus
    proc = start_paused(tiny_args(data_root, tmp_path / "run", 20), pause_at=5, stderr=subprocess.PIPE)
    try:
        proc.send_signal(signal.SIGINT)
        while "stopping after this step" not in proc.stderr.readline():
            assert proc.poll() is None
        time.sleep(1.5)  # a second Ctrl-C, not torchrun forwarding the first one
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == -signal.SIGINT  # killed by it: the shell's exit status 130
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(synthetic_corpus, tmp_path):
    """Threat: under torchrun a signal reaching one process only, leaving the others hanging in a collective."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "ddp"
    script = tmp_path / "pausing.py"
    script.write_text(PAUSING_TRAINER)
    proc = torchrun(script, tiny_args(data_root, run_dir, 20), env={"PAUSE_AT": "0", "SIGTERM_SELF_AT": "5"})
    assert "stopped by SIGTERM after step 5" in proc.stdout, output_tail(proc)
    checkpoint = ckpt.load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    assert checkpoint["step"] == 5 and [s["windows"] for s in checkpoint["loader"]] == [5, 5]


def test_wall_clock_checkpoints(synthetic_corpus, tmp_path, monkeypatch):
    """Threat: a long run between step-cadence checkpoints losing hours to a crash (`ckpt_every_minutes`)."""
    data_root, _ = synthetic_corpus
    saved = []
    real_save = Trainer.save

    def save(self, path):
        saved.append(self.step)
        return real_save(self, path)

    monkeypatch.setattr(Trainer, "save", save)
    assert run_main(tiny_args(data_root, tmp_path / "a", 4, "--ckpt_every_minutes", "1e-9")) == 0
    assert saved == [1, 2, 3, 4]  # every step is past the (tiny) interval
    saved.clear()
    assert run_main(tiny_args(data_root, tmp_path / "b", 4, "--ckpt_every_minutes", "0")) == 0
    assert saved == [4]  # off: the end only


# ---- 7. corpus identity ---------------------------------------------------------------------------------


def test_resume_and_eval_refuse_another_corpus(run, capsys):
    """Threat: a run resumed or scored on a corpus whose books or tokenizer changed since it trained."""
    data_root, run_dir = run
    dataset = os.path.join(data_root, "synth_256")
    recorded = json.loads((run_dir / "corpus.json").read_text())
    assert {k: recorded[k] for k in ("tokenizer_sha256", "file_lists_sha256")} == corpus_identity(dataset)
    assert ckpt.load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))["corpus"] == corpus_identity(dataset)

    write_file_list(data_root, "test", read_file_list(data_root, "test")[:-1])  # one book fewer
    before = file_bytes(run_dir, "env.json", "command.txt")
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 2
    assert "another corpus" in one_error_line(capsys) and file_bytes(run_dir, *before) == before
    assert run_eval(["--run_dir", str(run_dir)]) == 2
    assert "--allow_other_corpus" in one_error_line(capsys)
    assert run_eval(["--run_dir", str(run_dir), "--allow_other_corpus"]) == 0
    result = json.loads((run_dir / "eval" / "test@synth_256.json").read_text())
    assert result["other_corpus"] is True and result["corpus"] == corpus_identity(dataset)
    assert not (run_dir / "eval" / "test.json").exists()  # never in the place of the run's own result


def test_runs_without_a_recorded_corpus_are_accepted_with_a_warning(run, capsys):
    """Threat: runs of older versions (no corpus identity) becoming impossible to resume or evaluate."""
    data_root, run_dir = run
    os.unlink(run_dir / "corpus.json")
    path = run_dir / "checkpoints" / "latest.pt"
    torch.save({k: v for k, v in ckpt.load_checkpoint(str(path)).items() if k != "corpus"}, path)
    capsys.readouterr()
    assert run_eval(["--run_dir", str(run_dir)]) == 0
    assert "records no corpus identity" in capsys.readouterr().err
    assert json.loads((run_dir / "eval" / "test.json").read_text())["other_corpus"] is False
    assert run_main(tiny_args(data_root, run_dir, 3, "--resume", "auto")) == 0
    assert "records no corpus identity" in capsys.readouterr().err
    assert (run_dir / "corpus.json").is_file()  # recorded from now on


# ---- 8. flags and the quick start -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "main, argv",
    [
        (quickstart.main, ["--step", "10"]),
        (report.main, ["runs", "--ou", "elsewhere"]),
        (new_project.main, ["mine", "--fro", "lstm"]),
    ],
)
def test_abbreviated_flags_are_refused_in_one_line(capsys, main, argv):
    """Threat: argparse taking `--step` for `--steps` (or any prefix), so a typo silently means another flag."""
    assert exit_code(main, argv) == 2
    assert argv[-2] in one_error_line(capsys)


def test_quickstart_never_replaces_a_finished_run_without_overwrite(tmp_path, capsys):
    """Threat: `languini quickstart --steps 80` silently replacing a finished 40-step quick start."""
    out = tmp_path / "qs"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"project": "gpt", "preset": "nano", "max_train_steps": 40}))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, 41)))
    (out / "checkpoints" / "latest.pt").write_bytes(b"x")
    with pytest.raises(Exception, match="finished.*--overwrite"):
        quickstart.reuse_flags(str(out), "gpt", 80, overwrite=False)
    assert quickstart.reuse_flags(str(out), "gpt", 40, overwrite=False) == ["--resume", "auto"]


# ---- 9. environment failures, damaged inputs, absurd settings -----------------------------------------


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only")])
def test_full_or_read_only_disk_while_checkpointing_keeps_the_previous_checkpoint(run, monkeypatch, capsys, code, words):
    """Threat: a full disk or a folder turned read-only mid-run: traceback, or a damaged latest checkpoint."""
    data_root, run_dir = run
    path = run_dir / "checkpoints" / "latest.pt"
    before = path.read_bytes()

    real_open = atomic_io.atomic_open

    class FillsUp:  # the file torch.save writes to: its writes fail after the first 100 bytes
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(code, os.strerror(code))
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    @contextlib.contextmanager
    def filling_up(target, mode="wb"):  # torch's zip writer sees the failure and wraps it in its own error
        with real_open(target, mode) as f:
            yield FillsUp(f) if str(target).endswith("latest.pt") else f

    monkeypatch.setattr(atomic_io, "atomic_open", filling_up)
    assert run_main(tiny_args(data_root, run_dir, 4, "--resume", "auto", "--log_ckpt_every", "1")) == 2
    err = one_error_line(capsys)
    assert words in err and "previous checkpoint is intact" in err
    assert path.read_bytes() == before and ckpt.load_checkpoint(str(path))["step"] == 2
    assert os.listdir(run_dir / "checkpoints") == ["latest.pt"]


SHARDED_SAVE_FAILS = """
import errno, os, sys
import torch.distributed as dist
from languini.common_lib.errors import exit_on_user_error
from languini.projects import load_project
from languini.train_lib import checkpoint
from languini.train_lib.train_command import run_training

real_save = checkpoint.save_sharded
def save_sharded(folder, model, optimizer):
    if int(os.path.basename(folder)[5:13]) == 2:
        if os.environ["HOW"] == "file in the way":  # DCP's own failure: it cannot make its folder
            if os.environ["RANK"] == "0":
                open(folder, "w").close()
            dist.barrier()
        else:  # the disk fills up while both ranks write their shards
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "__%s_0.distcp" % os.environ["RANK"]), "wb") as f:
                f.write(b"half a shard")
            dist.barrier()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_save(folder, model, optimizer)
checkpoint.save_sharded = save_sharded
sys.exit(exit_on_user_error(run_training)(load_project("gpt"), sys.argv[1:]))
"""


@pytest.mark.parametrize("how, words", [("file in the way", "File exists"), ("disk full", "No space left")])
def test_failed_sharded_save_is_one_line_and_keeps_the_previous_checkpoint(synthetic_corpus, tmp_path, how, words):
    """Threat: DCP reporting a failed save as a BaseException that escapes the one-line handling (a traceback on
    every rank), and a half-written sharded folder holding the space a user frees."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "fsdp"
    script = tmp_path / "sharded_save_fails.py"
    script.write_text(SHARDED_SAVE_FAILS)
    args = tiny_args(data_root, run_dir, 4, "--parallel", "fsdp", "--log_ckpt_every", "1")
    proc = torchrun(script, args, env={"HOW": how})
    workers = proc.stderr.split("elastic/multiprocessing")[0]  # before torchrun's own report of the exit
    assert proc.returncode != 0 and "Traceback" not in workers, output_tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0] and "previous checkpoint is intact" in errors[0], output_tail(proc)
    checkpoint = ckpt.load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    assert checkpoint["step"] == 1
    left = sorted(os.listdir(run_dir / "checkpoints"))
    assert [n for n in left if n.startswith("step_00000001.")] == [checkpoint["sharded"]]
    assert [n for n in left if n.startswith("step_00000002.") and (run_dir / "checkpoints" / n).is_dir()] == []


def test_truncated_shard_is_one_line_on_resume(synthetic_corpus, tmp_path, capsys):
    """Threat: a shard cut short (a power loss, a bad disk) ending a resume in a traceback."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "fsdp"
    args = tiny_args(data_root, run_dir, 2, "--parallel", "fsdp", "--log_ckpt_every", "1")
    proc = torchrun(GPT_MAIN, args)
    assert proc.returncode == 0, output_tail(proc)
    folder = run_dir / "checkpoints" / ckpt.load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))["sharded"]
    for shard in folder.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert run_main(tiny_args(data_root, run_dir, 4, "--resume", "auto")) == 2
    assert "its sharded weights cannot be loaded" in one_error_line(capsys)


def test_disk_full_while_logging_gives_one_line(run, monkeypatch, capsys):
    """Threat: ENOSPC writing metrics.jsonl ending in a traceback."""
    data_root, run_dir = run

    def log(self, step, elapsed, metrics):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "metrics.jsonl"))

    monkeypatch.setattr(MetricsLogger, "log", log)
    assert run_main(tiny_args(data_root, run_dir, 4, "--resume", "auto")) == 2
    assert "No space left on device" in one_error_line(capsys)


def test_read_only_run_folder_gives_one_line(synthetic_corpus, tmp_path):
    """Threat: a run folder without write permission ending in a PermissionError traceback."""
    data_root, _ = synthetic_corpus
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    command = [sys.executable, GPT_MAIN, *tiny_args(data_root, run_dir, 2)]
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv cannot be denied a write")
        no_override = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={no_override}", f"--bounding-set={no_override}", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    finally:
        run_dir.chmod(0o755)
    if "setpriv" in command[0] and "setpriv:" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: cannot write to the run folder {run_dir}: Permission denied"
    assert os.listdir(run_dir) == []


def test_report_skips_metric_lines_with_bad_numbers(run, tmp_path, capsys):
    """Threat: one damaged metrics line (`1e400`, a string for a number) crashing `languini report`."""
    _, run_dir = run
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tokens": 192, "train/loss": 1e400}\n')
        f.write('{"step": 4, "tokens": "many", "train/loss": 5.0}\n')
        f.write('{"step": 5, "tokens": 320, "train/loss": "low"}\n')
    assert exit_code(report.main, [str(run_dir), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("not a finite number; skipped") == 3
    assert json.loads((tmp_path / "report" / "report.json").read_text())["runs"][0]["steps"] == 2


def test_eval_on_an_empty_split_names_it(run, capsys):
    """Threat: an empty split ending in a division by zero or an index error deep in the protocol."""
    data_root, run_dir = run
    write_file_list(data_root, "java", [])
    assert run_eval(["--run_dir", str(run_dir), "--eval_data_split", "java", "--allow_other_corpus"]) == 2
    assert "split 'java'" in one_error_line(capsys)


def test_min_lr_above_max_lr_is_refused(synthetic_corpus, tmp_path, capsys):
    """Threat: a schedule that rises while it should decay, trained for days before anyone notices."""
    data_root, _ = synthetic_corpus
    assert run_main(tiny_args(data_root, tmp_path / "run", 2, "--min_lr", "1e-2", "--max_lr", "1e-3")) == 2
    assert "--min_lr" in one_error_line(capsys) and not (tmp_path / "run").exists()


def test_absurd_seq_len_is_refused_before_allocating(synthetic_corpus, tmp_path, capsys):
    """Threat: `--seq_len 1000000000` allocating until the machine swaps or the OOM killer strikes."""
    data_root, _ = synthetic_corpus
    assert run_main(tiny_args(data_root, tmp_path / "run", 2, "--seq_len", str(10**9))) == 2
    err = one_error_line(capsys)
    assert "needs at least" in err and "--seq_len" in err and not (tmp_path / "run").exists()



def test_a_file_that_is_no_checkpoint_is_not_called_dangerous(tmp_path):
    """Text or another format is a damaged file, not a pickle with code in it: the message must say so."""
    path = tmp_path / "garbage.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="is not a PyTorch checkpoint") as info:
        ckpt.load_checkpoint(str(path))
    assert "could run code" not in str(info.value)
