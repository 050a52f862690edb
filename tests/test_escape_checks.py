"""Names and files from shared or damaged data never lead a write elsewhere or hang: crafted split and dataset
names, a crafted corpus --name, an existing archive, a FIFO in a bundle, a huge file-list count and a damaged
corpus.json each end in one `error:` line (or a verification problem), and nothing is written outside."""

import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
from helpers import exit_code, make_synthetic_corpus
from test_eval_cli import fabricate_run
from test_hardening_data import assert_one_error_line
from test_report import make_run

from languini.common_lib.errors import UserError
from languini.dataset_lib import cli as data_cli
from languini.dataset_lib import layout
from languini.dataset_lib.languini_books import read_split_tokens
from languini.projects.gpt import eval as gpt_eval
from languini.report_lib import report
from languini.tools import export
from languini.train_lib import bundle


def one_error_line(capsys, fn, *args) -> str:
    """Run a command-line entry point, expect exit 2 and exactly one `error:` line; return it."""
    assert exit_code(fn, *args) == 2
    return assert_one_error_line(capsys.readouterr().err)


def escaping_split(tmp_path, kind: str) -> tuple[str, str]:
    """(split name, the .json file eval.py would write for it): an absolute path or one climbing with `..`."""
    if kind == "absolute":
        target = str(tmp_path / "ESCAPE" / "pwn")
        return target, target + ".json"
    return "../../pwn", str(tmp_path / "pwn.json")  # from <tmp_path>/run/eval


def ship_split_list(data_root: str, split: str):
    """The crafted split's file list, where os.path.join puts it (`file_list_test_<split>.npy`, folders
    included): a copy of the test list, so only the name check can stop the evaluation."""
    path = os.path.join(data_root, f"file_list_test_{split}.npy")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copy(os.path.join(data_root, "file_list_test_iid.npy"), path)


# ---- split names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "test", "iid", "test_iid", "stats", "wood", "ood", "java", "all"])
def test_built_in_and_ordinary_split_names_are_kept(name):
    assert layout.split_list_name(name).startswith("file_list_")
    assert "/" not in layout.split_list_name(name)


@pytest.mark.parametrize("name", ["/tmp/x", "../x", "a/b", "", "a b", "1st", "x" * 65, "é"])
def test_split_names_that_are_not_safe_identifiers_are_refused(synthetic_corpus, name):
    with pytest.raises(UserError, match="not a safe identifier"):
        layout.split_list_name(name)
    with pytest.raises(UserError, match="not a safe identifier"):
        layout.read_file_list(synthetic_corpus[0], name)


def test_a_file_list_with_an_odd_name_is_no_split(synthetic_corpus):
    data_root = synthetic_corpus[0]
    for name in ("a b", "ood"):
        shutil.copy(os.path.join(data_root, "file_list_test_iid.npy"), os.path.join(data_root, f"file_list_test_{name}.npy"))
    assert layout.list_splits(data_root) == ["train", "test", "ood"]


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
@pytest.mark.parametrize("source", ["flag", "config"])
def test_eval_refuses_a_crafted_split_from_the_flag_or_the_config(synthetic_corpus, tmp_path, capsys, kind, source):
    data_root = synthetic_corpus[0]
    split, written = escaping_split(tmp_path, kind)
    ship_split_list(data_root, split)
    run_dir = fabricate_run(tmp_path / "run", data_root, "gpt",
                            **({"eval_data_split": split} if source == "config" else {}))  # fmt: skip
    os.makedirs(os.path.join(run_dir, "eval"))  # as after an earlier evaluation: the escaping write would succeed
    flag = ["--eval_data_split", split] if source == "flag" else []
    line = one_error_line(capsys, gpt_eval.main, ["--run_dir", run_dir, *flag])
    assert "eval_data_split" in line and "not a safe identifier" in line
    assert not os.path.exists(written)


def test_a_shared_bundle_cannot_make_eval_write_outside(synthetic_corpus, tmp_path, capsys):
    """The bundle ships its own data folder and a split named by an absolute path (with its file list)."""
    data_root = synthetic_corpus[0]
    run_dir = fabricate_run(tmp_path / "run", data_root, "gpt")
    evil = str(tmp_path / "evil")
    export.export_run(run_dir, evil)
    split, written = escaping_split(tmp_path, "absolute")
    shutil.copytree(data_root, os.path.join(evil, "d"))
    ship_split_list(os.path.join(evil, "d"), split)
    config_path = os.path.join(evil, bundle.CONFIG)
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "data_root": os.path.join(evil, "d"), "eval_data_split": split}, f)
    with open(os.path.join(evil, bundle.MANIFEST), "w") as f:
        f.write(bundle.manifest_text(evil))

    assert export.verify_main([evil]) == 1
    assert "eval_data_split" in capsys.readouterr().err
    line = one_error_line(capsys, gpt_eval.main, ["--bundle", evil])
    assert "not a safe identifier" in line
    assert not os.path.exists(written) and not os.path.exists(os.path.dirname(written))


# ---- report plot names -----------------------------------------------------------------------------------


def test_report_plots_of_crafted_dataset_names_stay_in_out(tmp_path):
    escape = tmp_path / "ESCAPE2"
    crafted = ["/+", "/" + "../" * 30 + str(escape / "x").lstrip("/"), "../x", "a/b", "a_b"]
    for i, dataset in enumerate(crafted + ["demo_4096"]):
        make_run(str(tmp_path / "runs"), f"r{i}", dataset=dataset, evals={"test": 50.0 + i})
    out = tmp_path / "out"
    data = report.build_report(report.load_runs([str(tmp_path / "runs")]), str(out))
    files = data["scaling"]["files"]
    assert files["demo_4096"] == "scaling_demo_4096.png" and files["a_b"] == "scaling_a_b.png"
    assert len(set(files.values())) == len(files) == len(crafted) + 1  # no two datasets share a plot
    for name in files.values():
        assert "/" not in name and (out / name).is_file()
    assert not escape.exists() and not (tmp_path / "x.png").exists()


def test_a_dataset_that_is_not_a_string_does_not_stop_the_report(tmp_path):
    make_run(str(tmp_path / "runs"), "a", dataset=["x"], evals={"test": 50.0})
    make_run(str(tmp_path / "runs"), "b", evals={"test": 51.0})
    data = report.build_report(report.load_runs([str(tmp_path / "runs")]), str(tmp_path / "out"))
    assert sorted(data["scaling"]["files"]) == ["['x']", "demo_4096"]


# ---- prepare --name --------------------------------------------------------------------------------------


def test_prepare_refuses_a_corpus_name_that_leaves_out(tmp_path, capsys, monkeypatch):
    books = tmp_path / "books"
    books.mkdir()
    for i in range(3):
        (books / f"b{i}.txt").write_text("a few words of a book\n" * 50)
    monkeypatch.chdir(tmp_path)
    argv = ["prepare", "folder", str(books), "--out", "corp/mine", "--name", "../../OUTSIDE_DS",
            "--vocab-size", "300", "--workers", "1", "--no-progress"]  # fmt: skip
    line = one_error_line(capsys, data_cli.main, argv)
    assert "--name" in line and "not a safe identifier" in line
    assert sorted(os.listdir(tmp_path)) == ["books"]


# ---- export --archive ------------------------------------------------------------------------------------


def test_export_refuses_an_existing_archive_and_leaves_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    archive = tmp_path / "z.tar.gz"
    archive.write_text("the user's own file")
    argv = ["--run_dir", str(run_dir), "--out", str(tmp_path / "z"), "--archive"]
    line = one_error_line(capsys, export.export_main, argv)
    assert str(archive) in line and "already exists" in line
    assert archive.read_text() == "the user's own file" and not (tmp_path / "z").exists()


def test_the_archive_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    export.write_archive(str(folder), str(tmp_path / "new.tar.gz"))
    assert (tmp_path / "new.tar.gz").stat().st_size > 0
    (tmp_path / "late.tar.gz").write_text("appeared meanwhile")
    with pytest.raises(UserError, match="appeared while"):
        export.write_archive(str(folder), str(tmp_path / "late.tar.gz"))
    assert (tmp_path / "late.tar.gz").read_text() == "appeared meanwhile"
    assert sorted(os.listdir(tmp_path)) == ["b", "late.tar.gz", "new.tar.gz"]  # no temporary left behind


# ---- verify-bundle on special files ----------------------------------------------------------------------


def _timeout(signum, frame):
    raise TimeoutError("verify-bundle blocked")


def test_verify_bundle_refuses_a_fifo_without_opening_it(tmp_path, capsys):
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "README.md").write_text("hi")
    os.mkfifo(folder / "pipe")
    (folder / bundle.MANIFEST).write_text(f"{'0' * 64}  README.md\n{'0' * 64}  pipe\n")
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(10)
    try:
        assert export.verify_main([str(folder)]) == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "problem: pipe is a special file (pipe, socket or device)" in capsys.readouterr().err


def test_verify_bundle_names_a_symbolic_link(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    (tmp_path / "outside").write_text("secret")
    os.symlink(tmp_path / "outside", folder / "link")
    (folder / bundle.MANIFEST).write_text(f"{layout.sha256_file(tmp_path / 'outside')}  link\n")
    assert "link is a symbolic link (a bundle holds plain files only)" in bundle.verify_bundle(str(folder), None)


# ---- damaged inputs --------------------------------------------------------------------------------------


def test_a_huge_count_is_named_before_any_memory_is_asked_for(tmp_path):
    data_root = str(tmp_path / "data")
    dataset = make_synthetic_corpus(data_root)
    rows = layout.read_file_list(data_root, "test")
    np.save(os.path.join(data_root, "file_list_test_iid.npy"),
            np.array([[rows[0][0], str(10**13)]] + [[p, str(n)] for p, n in rows[1:]]))  # fmt: skip
    with pytest.raises(UserError, match=f"{rows[0][0]}.*split list says {10**13}"):
        read_split_tokens(dataset, "test")


def test_export_names_a_damaged_corpus_json(tmp_path):
    (tmp_path / bundle.CORPUS).write_text('{"tokenizer_sha256": ')
    with pytest.raises(UserError, match=re.escape(str(tmp_path / bundle.CORPUS))):
        export._corpus(str(tmp_path), None)
