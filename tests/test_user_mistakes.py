"""Mistakes a new user makes with the tools around a trained run (eval, export, report, sample, data,
new-project): each is one `error:` line and exit code 2 with nothing written, or does what the docs say."""

import json
import os
import shutil
import stat
import tarfile

import pytest
from helpers import exit_code, make_synthetic_corpus, tiny_run_args
from test_hardening_data import assert_one_error_line, one_line_error
from test_report import make_run

from languini.common_lib.errors import UserError
from languini.dataset_lib.tokenizer_model import train_tokenizer
from languini.projects import load_project
from languini.projects.gpt import eval as gpt_eval
from languini.report_lib import report
from languini.report_lib.runs import load_run
from languini.tools import export, new_project, sample
from languini.train_lib import bundle
from languini.train_lib.eval_command import run_eval
from languini.train_lib.train_command import run_training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data_root, run folder) of a 3-step tiny GPT run, evaluated on its test split."""
    root = tmp_path_factory.mktemp("mistakes")
    data_root = str(root / "data")
    make_synthetic_corpus(data_root)
    run_dir = str(root / "run")
    spec = load_project("gpt")
    assert run_training(spec, tiny_run_args("gpt", data_root, run_dir, 3)) == 0
    assert run_eval(spec, ["--run_dir", run_dir, "--last_n", "8"]) == 0
    return data_root, run_dir


@pytest.fixture(scope="module")
def shared(run, tmp_path_factory):
    """The run exported as a bundle (tests change a copy)."""
    out = str(tmp_path_factory.mktemp("shared") / "bundle")
    export.export_run(run[1], out)
    return out


def one_error(capsys, fn, *args) -> str:
    """Run a command-line entry point: exit code 2, exactly one `error:` line and nothing on stdout."""
    assert exit_code(fn, *args) == 2
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    return assert_one_error_line(captured.err)


def tampered_copy(shared, tmp_path) -> str:
    copy = str(tmp_path / "tampered")
    shutil.copytree(shared, copy)
    with open(os.path.join(copy, "config.json"), "a") as f:
        f.write("x\n")
    return copy


# ---- bundles are verified before they are read ------------------------------------------------------------


def test_eval_verifies_a_bundle_before_reading_its_config(shared, tmp_path, capsys):
    line = one_error(capsys, gpt_eval.main, ["--bundle", tampered_copy(shared, tmp_path)])
    assert "failed verification: config.json does not match its hash" in line
    assert not os.path.exists(str(tmp_path / "tampered") + ".eval")


def test_report_refuses_a_bundle_that_fails_verification(run, shared, tmp_path, capsys):
    tampered = tampered_copy(shared, tmp_path)
    line = one_error(capsys, report.main, [run[1], tampered, "--out", str(tmp_path / "report")])
    assert f"bundle {tampered} failed verification" in line
    assert not os.path.exists(tmp_path / "report")


def test_sample_names_the_missing_bundle(capsys, tmp_path):
    line = one_error(capsys, sample.main, ["--bundle", str(tmp_path / "nope"), "--prompt", "x"])
    assert f"no bundle folder at {tmp_path / 'nope'}" in line and "--run_dir" not in line


# ---- report ------------------------------------------------------------------------------------------------


def test_report_out_that_cannot_be_created_is_one_line(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = one_error(capsys, report.main, [run[1], "--out", str(tmp_path / "file" / "x")])
    assert f"cannot write the report to {tmp_path / 'file' / 'x'}" in line


def test_report_refuses_a_split_no_run_has(run, tmp_path, capsys):
    line = one_error(capsys, report.main, [run[1], "--split", "tset", "--out", str(tmp_path / "report")])
    assert "no run has results on split 'tset'" in line and "did you mean 'test'" in line
    assert not os.path.exists(tmp_path / "report")


def test_report_warns_about_runs_without_the_split(tmp_path):
    runs = [load_run(make_run(tmp_path, "a", evals={"test": 20.0, "java": 30.0})),
            load_run(make_run(tmp_path, "b", evals={"test": 25.0}))]  # fmt: skip
    data = report.build_report(runs, str(tmp_path / "report"), split="java")
    assert "no result on split 'java' for b: not in the scaling plot" in data["warnings"]
    assert "of None" not in (tmp_path / "report" / "report.md").read_text()


def test_report_forced_hours_axis_needs_every_throughput(tmp_path, capsys):
    make_run(tmp_path / "runs", "measured", tokens_per_second=2e3, evals={"test": 20.0})
    make_run(tmp_path / "runs", "cpu", evals={"test": 25.0})
    argv = [str(tmp_path / "runs"), "--x", "ref_gpu_hours", "--out", str(tmp_path / "report")]
    line = one_error(capsys, report.main, argv)
    assert "tokens_per_second is 0 for cpu" in line and "--tokens_per_second" in line
    assert not os.path.exists(tmp_path / "report")


# ---- results on another corpus ----------------------------------------------------------------------------


def test_a_result_on_another_corpus_never_replaces_the_runs_own(run, tmp_path, capsys):
    data_root, trained = run
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    own = open(os.path.join(run_dir, "eval", "test.json")).read()
    other_root = str(tmp_path / "other")
    make_synthetic_corpus(other_root, splits={"train": [300], "test": [200, 100]})  # other books
    argv = ["--run_dir", run_dir, "--data_root", other_root, "--last_n", "8", "--allow_other_corpus"]
    assert gpt_eval.main(argv) == 0
    assert "as <split>@synth_256.json (another corpus" in capsys.readouterr().out

    assert open(os.path.join(run_dir, "eval", "test.json")).read() == own
    with open(os.path.join(run_dir, "eval", "test@synth_256.json")) as f:
        assert json.load(f)["other_corpus"] is True
    loaded = load_run(run_dir)
    assert loaded.evals["test"] == json.loads(own)
    assert any("eval/test@synth_256.json scored the run on another corpus" in w for w in loaded.warnings)
    assert list(bundle.read_eval_results(run_dir)) == ["test"]


def test_an_older_other_corpus_result_is_not_reported_as_the_runs(tmp_path):
    run_dir = make_run(tmp_path, "old", evals={"test": 20.0})
    path = os.path.join(run_dir, "eval", "test.json")
    with open(path) as f:
        result = json.load(f)
    with open(path, "w") as f:
        json.dump({**result, "other_corpus": True}, f)
    assert load_run(run_dir).evals == {} and bundle.read_eval_results(run_dir) == {}


# ---- eval flags --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("last_n", ["0", "-5", "500"])
def test_eval_checks_last_n_before_any_output(run, capsys, last_n):
    line = one_error(capsys, gpt_eval.main, ["--run_dir", run[1], "--last_n", last_n])
    assert f"--last_n must be in 1..seq_len (16); got {last_n}" in line


def test_a_mistyped_eval_flag_suggests_evals_own(run, capsys):
    line = one_error(capsys, gpt_eval.main, ["--run_dir", run[1], "--max_token", "5"])
    assert "did you mean '--max_tokens'" in line


# ---- export ------------------------------------------------------------------------------------------------


def test_export_gives_the_usual_permissions_also_in_the_archive(run, tmp_path):
    out = str(tmp_path / "bundle")
    old = os.umask(0o022)
    try:
        export.export_run(run[1], out, archive=True)
    finally:
        os.umask(old)
    for folder, _, files in os.walk(out):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o644, name
    with tarfile.open(export.archive_path(out)) as tar:
        assert {m.name: m.mode for m in tar.getmembers() if m.isdir()} == {"bundle": 0o755, "bundle/eval": 0o755}
        assert {m.mode for m in tar.getmembers() if m.isfile()} == {0o644}


def test_export_refuses_a_folder_that_appears_while_it_assembles(run, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    manifest_text = bundle.manifest_text

    def late_folder(folder):
        out.mkdir()  # an empty folder a rename would silently replace
        return manifest_text(folder)

    monkeypatch.setattr(bundle, "manifest_text", late_folder)
    with pytest.raises(UserError, match="appeared while the bundle was assembled"):
        export.export_run(run[1], str(out))
    assert os.listdir(tmp_path) == ["bundle"] and os.listdir(out) == []


# ---- argparse mistakes are one line ------------------------------------------------------------------------


@pytest.mark.parametrize("main, argv, expected", [
    (export.export_main, ["--run_dir", "runs/g"], "languini export: the following arguments are required: --out"),
    (export.verify_main, [], "languini verify-bundle: the following arguments are required: bundle"),
    (report.main, ["--x", "hours", "runs"], "languini report: argument --x: invalid choice"),
    (new_project.main, [], "languini new-project: the following arguments are required: name"),
])  # fmt: skip
def test_usage_mistakes_are_one_line(capsys, main, argv, expected):
    assert expected in one_error(capsys, main, argv)


# ---- data --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["demo", "--vocab-size", "100", "--cache", "TMP"], "--vocab-size must be at least 260"),
    (["demo", "--vocab-size", "-5", "--cache", "TMP"], "--vocab-size must be at least 260"),
    (["folder", "TMP", "--max-books", "-3"], "--max-books must be at least 1"),
    (["folder", "TMP", "--max-books", "0"], "--max-books must be at least 1"),
    (["pg19", "--max-books", "-3", "--base-url", "http://127.0.0.1:9/"], "--max-books must be at least 1"),
])  # fmt: skip
def test_prepare_checks_counts_before_reading_or_writing(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    argv = ["prepare", *(str(tmp_path) if a == "TMP" else a for a in argv), "--out", str(out)]
    assert expected in one_line_error(capsys, argv)
    assert not out.exists()


def test_a_too_small_vocabulary_asks_for_a_larger_one():
    with pytest.raises(UserError, match="try a larger --vocab-size"):
        train_tokenizer(["".join(chr(c) for c in range(0x4E00, 0x4E00 + 200)) * 5], 270)


@pytest.mark.parametrize("command", ["verify", "info"])
def test_a_corpus_folder_names_its_dataset_folders(tmp_path, capsys, command):
    corpus = tmp_path / "demo"
    (corpus / "demo_4096").mkdir(parents=True)
    (corpus / "demo_4096" / "meta.json").write_text(json.dumps({"dataset": "demo_4096"}))
    line = one_line_error(capsys, [command, str(corpus)])
    assert f"it is a corpus folder: pass its dataset folder, {corpus / 'demo_4096'}" in line


# ---- new-project -------------------------------------------------------------------------------------------


def test_new_project_names_a_python_keyword(tmp_path, capsys):
    line = one_error(capsys, new_project.main, ["import", "--dest", str(tmp_path)])
    assert "'import': it is a Python keyword" in line and os.listdir(tmp_path) == []


def test_new_project_refuses_a_name_that_shadows_a_module(tmp_path, capsys):
    (tmp_path / "commands.py").write_text("")  # as languini/projects/commands.py
    line = one_error(capsys, new_project.main, ["commands", "--dest", str(tmp_path)])
    assert "would shadow the module" in line and os.listdir(tmp_path) == ["commands.py"]
