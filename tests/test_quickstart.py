"""`languini quickstart`: the flow with stand-in trainer and evaluation (fast), and the real thing (slow)."""

import json
import os

import pytest

from languini import quickstart
from languini.common_lib.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_fake_run(run_dir, steps, preset="nano", checkpoint=True):
    """What the trainer leaves behind: config.json, metrics.jsonl and a checkpoint."""
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"project": "gpt", "preset": preset, "max_train_steps": steps}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1):
            f.write(
                json.dumps({"step": step, "tokens": step * 2048, "train/loss": 8.0 - step / steps}) + "\n"
            )
    if checkpoint:
        open(os.path.join(run_dir, "checkpoints", "latest.pt"), "wb").close()


@pytest.fixture
def fake_project(monkeypatch):
    """Stand-ins for the demo data, the trainer and eval.py that record how the quick start calls them."""
    calls = {"train": [], "eval": [], "prepare": 0}

    def train(spec, argv):
        calls["train"].append(argv)
        write_fake_run(argv[argv.index("--run_dir") + 1], int(argv[argv.index("--max_train_steps") + 1]))
        return 0

    def evaluate(spec, argv):
        calls["eval"].append(argv)
        run_dir = argv[argv.index("--run_dir") + 1]
        os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
        result = dict(split="test", normalised_ppl=3.2109, bits_per_byte=1.5, n_tokens=12345)
        with open(os.path.join(run_dir, "eval", "test.json"), "w") as f:
            json.dump(result, f)
        return 0

    monkeypatch.setattr(quickstart, "run_training", train)
    monkeypatch.setattr(quickstart, "run_eval", evaluate)
    monkeypatch.setattr(quickstart, "ensure_demo_data", lambda cfg: calls.__setitem__("prepare", 1))
    return calls


def test_quickstart_trains_evaluates_and_plots(tmp_path, fake_project, capsys):
    out = str(tmp_path / "qs")
    assert quickstart.main(["--steps", "40", "--out", out]) == 0
    (train_argv,) = fake_project["train"]
    assert train_argv[0] == "nano"
    flags = dict(zip(train_argv[1::2], train_argv[2::2]))
    assert flags["--max_train_steps"] == flags["--decay_steps"] == "40" and flags["--device"] == "cpu"
    assert int(flags["--warmup_steps"]) <= 8 and "--resume" not in flags and "--overwrite" not in flags
    assert fake_project["eval"] == [["--run_dir", out, "--eval_data_split", "test"]]
    assert "normalised perplexity on the demo test split: 3.2109" in capsys.readouterr().out
    with open(os.path.join(out, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_continues_the_same_run_and_replaces_another_only_with_overwrite(tmp_path, fake_project):
    out = str(tmp_path / "qs")
    assert quickstart.reuse_flags(out, "gpt", 40, overwrite=False) == []
    write_fake_run(out, 40)
    assert quickstart.reuse_flags(out, "gpt", 40, overwrite=False) == ["--resume", "auto"]
    assert quickstart.reuse_flags(out, "gpt", 40, overwrite=True) == ["--overwrite"]
    assert quickstart.reuse_flags(out, "gpt", 80, overwrite=True) == ["--overwrite"]
    with pytest.raises(UserError, match="another quickstart run .*40 steps, finished.*--overwrite"):
        quickstart.reuse_flags(out, "gpt", 80, overwrite=False)
    with pytest.raises(UserError, match="--overwrite"):
        quickstart.reuse_flags(out, "lstm", 40, overwrite=False)
    os.unlink(os.path.join(out, "checkpoints", "latest.pt"))  # the same run, stopped before a checkpoint
    assert quickstart.reuse_flags(out, "gpt", 40, overwrite=False) == ["--overwrite"]


def test_a_finished_run_is_never_replaced_without_overwrite(tmp_path, fake_project, capsys):
    """`languini quickstart --steps 80` over a finished 40-step run: one line, the run untouched."""
    out = str(tmp_path / "qs")
    assert quickstart.main(["--steps", "40", "--out", out]) == 0
    before = open(os.path.join(out, "metrics.jsonl")).read()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        quickstart.main(["--steps", "80", "--out", out])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    assert open(os.path.join(out, "metrics.jsonl")).read() == before and len(fake_project["train"]) == 1
    assert quickstart.main(["--steps", "80", "--out", out, "--overwrite"]) == 0
    assert fake_project["train"][-1][-1] == "--overwrite"


def test_refuses_to_replace_a_run_that_is_not_a_quickstart(tmp_path):
    out = str(tmp_path / "precious")
    write_fake_run(out, 1000, preset="small")
    with pytest.raises(UserError, match="not a quickstart run"):
        quickstart.reuse_flags(out, "gpt", 1000, overwrite=True)


def test_bad_steps_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as exc:
        quickstart.main(["--steps", "0"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err


def test_abbreviated_flags_are_refused_in_one_line(capsys):
    """`--step 10` is not `--steps 10`: argparse's prefix matching is off, and its error is one line."""
    with pytest.raises(SystemExit) as exc:
        quickstart.main(["--step", "10"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "--step" in err and "\n" not in err


@pytest.mark.slow
def test_real_quickstart_end_to_end(tmp_path, monkeypatch, capsys):
    """Prepares the demo corpus in the repo's data/ when missing (needs pip's network or cache)."""
    monkeypatch.chdir(REPO_ROOT)
    out = str(tmp_path / "qs")
    assert quickstart.main(["--steps", "30", "--out", out]) == 0
    with open(os.path.join(out, "eval", "test.json")) as f:
        result = json.load(f)
    assert 1.0 < result["normalised_ppl"] < 1e4 and result["checkpoint_step"] == 30
    assert f"{result['normalised_ppl']:.4f}" in capsys.readouterr().out
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 1000
