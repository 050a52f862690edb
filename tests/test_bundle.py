"""Run bundles: export -> verify-bundle, tampering caught line by line, safe weights, evaluation and
reports straight from a bundle."""

import json
import os
import pickle
import tarfile

import pytest
import torch
from helpers import exit_code, make_synthetic_corpus, tiny_run_args

from languini.common_lib.errors import UserError
from languini.projects import load_project
from languini.tools import export
from languini.train_lib.bundle import MANIFEST, WEIGHTS
from languini.train_lib.eval_command import run_eval
from languini.train_lib.train_command import run_training


@pytest.fixture(scope="module", params=["gpt", "lstm"])
def trained_run(request, tmp_path_factory):
    """A 3-step tiny run of the project, evaluated on its test split."""
    project = request.param
    root = tmp_path_factory.mktemp(f"bundle_{project}")
    data_root = str(root / "data")
    make_synthetic_corpus(data_root)
    run_dir = str(root / "run")
    spec = load_project(project)
    assert run_training(spec, tiny_run_args(project, data_root, run_dir, 3)) == 0
    assert run_eval(spec, ["--run_dir", run_dir, "--last_n", "8"]) == 0
    return project, run_dir


def test_export_then_verify(trained_run, tmp_path, capsys):
    project, run_dir = trained_run
    out = str(tmp_path / "bundle")
    assert export.export_main(["--run_dir", run_dir, "--out", out, "--archive"]) == 0
    files = sorted(os.listdir(out))
    assert {WEIGHTS, MANIFEST, "README.md", "config.json", "metrics.jsonl", "eval"} <= set(files)
    assert "checkpoints" not in files  # weights only: no optimiser, RNG or loader state
    readme = open(os.path.join(out, "README.md")).read()
    assert f"python3 languini/projects/{project}/eval.py --bundle" in readme and "| test |" in readme
    assert export.verify_main([out]) == 0
    assert export.verify_main([out + ".tar.gz"]) == 0
    assert "OK" in capsys.readouterr().out


def _problems(bundle, capsys) -> list[str]:
    assert export.verify_main([str(bundle)]) == 1
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("problem:")]


@pytest.mark.parametrize("victim", ["config.json", "metrics.jsonl", "README.md", WEIGHTS, "eval/test.json"])
def test_one_flipped_byte_anywhere_is_caught(trained_run, tmp_path, capsys, victim):
    out = tmp_path / "bundle"
    export.export_run(trained_run[1], str(out))
    path = out / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    (problem,) = _problems(out, capsys)
    assert victim in problem and "does not match its hash" in problem


def test_added_file_and_truncated_weights_are_caught(trained_run, tmp_path, capsys):
    out = tmp_path / "bundle"
    export.export_run(trained_run[1], str(out))
    (out / "extra.py").write_text("print('hi')\n")
    assert any("extra.py is not in" in p for p in _problems(out, capsys))
    (out / "extra.py").unlink()
    weights = out / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    assert any(WEIGHTS in p for p in _problems(out, capsys))


def test_weights_that_do_not_fit_the_model_are_caught(trained_run, tmp_path, capsys):
    """A bundle re-hashed after its weights were swapped for another shape still fails verification."""
    from safetensors.torch import load_file, save_file

    from languini.train_lib.bundle import manifest_text

    out = tmp_path / "bundle"
    export.export_run(trained_run[1], str(out))
    weights = load_file(str(out / WEIGHTS))
    name = sorted(weights)[0]
    weights[name] = torch.zeros(3, 3)
    save_file(weights, str(out / WEIGHTS))
    (out / MANIFEST).write_text(manifest_text(str(out)))
    assert any(name in p and "the model's" in p for p in _problems(out, capsys))


class Payload:
    """Writes a marker file when unpickled: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_export_never_executes_a_pickled_object(trained_run, tmp_path):
    project, run_dir = trained_run
    hostile = tmp_path / "hostile_run"
    os.makedirs(hostile / "checkpoints")
    for name in ("config.json", "metrics.jsonl"):
        (hostile / name).write_bytes(open(os.path.join(run_dir, name), "rb").read())
    marker = tmp_path / "executed"
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)
    checkpoint["evil"] = Payload(str(marker))
    torch.save(checkpoint, hostile / "checkpoints" / "latest.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    assert exit_code(export.export_main, ["--run_dir", str(hostile), "--out", str(tmp_path / "b")]) == 2
    assert not marker.exists() and not (tmp_path / "b").exists()


def test_refuses_an_existing_out_and_a_missing_run(trained_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert exit_code(export.export_main, ["--run_dir", trained_run[1], "--out", str(out)]) == 2
    assert (out / "mine.txt").read_text() == "keep"
    assert exit_code(export.export_main, ["--run_dir", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2


def test_archive_with_a_link_or_escaping_path_is_refused(tmp_path, capsys):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("bundle/../../escape.txt")
        tar.addfile(info)
    assert exit_code(export.verify_main, [str(archive)]) == 2
    assert "never does" in capsys.readouterr().err


def test_a_run_without_final_eval_says_so(trained_run, tmp_path):
    project, run_dir = trained_run
    bare = tmp_path / "bare"
    os.makedirs(bare / "checkpoints")
    for name in ("config.json", "checkpoints/latest.pt"):
        (bare / name).write_bytes(open(os.path.join(run_dir, name), "rb").read())
    export.export_run(str(bare), str(tmp_path / "b"))
    assert "No final evaluation was run" in (tmp_path / "b" / "README.md").read_text()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["project"] == project


def test_sample_from_a_bundle_equals_sampling_the_run(tmp_path, capsys):
    """A 2-step GPT on a vocab-320 corpus with a tokenizer made for the test (byte fallback needs > 256)."""
    from languini.dataset_lib.tokenizer_model import train_tokenizer
    from languini.tools import sample

    data_root, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
    dataset = make_synthetic_corpus(data_root, dataset="synth_320", vocab_size=320)
    books = ["\n".join(f"line {i} of some words to learn from" for i in range(60)) for _ in range(3)]
    with open(os.path.join(dataset, "tokenizer.model"), "wb") as f:
        f.write(train_tokenizer(books, 320))
    flags = tiny_run_args("gpt", data_root, run_dir, 2, "--dataset", "synth_320", "--vocab_size", "320")
    assert run_training(load_project("gpt"), flags) == 0
    out = tmp_path / "bundle"
    export.export_run(run_dir, str(out))
    assert (out / "tokenizer.model").is_file()
    flags = ["--prompt", "line 3", "--max_new_tokens", "5", "--seed", "1", "--device", "cpu"]
    capsys.readouterr()
    assert sample.main(["--run_dir", run_dir, *flags]) == 0
    from_run = capsys.readouterr().out
    assert sample.main(["--bundle", str(out), *flags]) == 0
    assert capsys.readouterr().out == from_run and from_run.startswith("line 3")


def test_eval_from_the_bundle_reproduces_the_runs_results(trained_run, tmp_path, capsys):
    project, run_dir = trained_run
    out = tmp_path / "bundle"
    export.export_run(run_dir, str(out))
    capsys.readouterr()
    assert run_eval(load_project(project), ["--bundle", str(out), "--last_n", "8"]) == 0
    assert "test: reproduces the bundle's result exactly" in capsys.readouterr().out
    ours = json.loads((tmp_path / "bundle.eval" / "eval" / "test.json").read_text())
    theirs = json.loads((out / "eval" / "test.json").read_text())
    for key in ("n_tokens", "loss", "normalised_ppl", "bits_per_byte", "top1", "top10", "protocol"):
        assert ours[key] == theirs[key], key
    assert export.verify_main([str(out)]) == 0  # evaluating wrote nothing into the bundle


def test_eval_refuses_a_tampered_bundle(trained_run, tmp_path, capsys):
    project, run_dir = trained_run
    out = tmp_path / "bundle"
    export.export_run(run_dir, str(out))
    (out / "extra.txt").write_text("x")
    with pytest.raises(UserError, match="extra.txt is not in"):
        run_eval(load_project(project), ["--bundle", str(out)])


def test_report_reads_a_bundle_beside_a_run(trained_run, tmp_path):
    from languini.report_lib import report

    project, run_dir = trained_run
    out = tmp_path / "bundle"
    export.export_run(run_dir, str(out))
    assert report.main([run_dir, str(out), "--out", str(tmp_path / "report")]) == 0
    rows = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert any(line.startswith(f"| run | {project} |") for line in rows)
    assert any(line.startswith(f"| bundle | {project} |") for line in rows)
