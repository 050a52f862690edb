"""`languini new-project`: a renamed, self-contained copy of a project that trains and evaluates at once."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, make_synthetic_corpus, output_tail, torchrun

import languini.projects
from languini.common_lib.errors import UserError
from languini.projects import PROJECTS_DIR
from languini.tools import new_project


def all_text(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith((".py", ".md")):
            with open(os.path.join(folder, name)) as f:
                out[name] = f.read()
    return out


@pytest.mark.parametrize("source", ["gpt", "lstm"])
def test_copy_is_renamed_and_importable(tmp_path, monkeypatch, source):
    name = f"np_{source}_copy"
    assert new_project.main([name, "--from", source, "--dest", str(tmp_path)]) == 0
    folder = tmp_path / name
    texts = all_text(folder)
    assert "configs.py" in texts and "model.py" in texts and "README.md" in texts
    assert not (folder / "__pycache__").exists() and not (folder / "throughput_results.csv").exists()
    for file, text in texts.items():  # nothing still points at the source project
        assert f"languini.projects.{source}" not in text and f"languini/projects/{source}/" not in text, file
    assert texts["README.md"].startswith(f"# {name}\n")
    for section in ("## Method", "## Reproduce each compute class", "## Results", "## Download", "## Citation"):
        assert section in texts["README.md"]
    assert "@misc{" + name in texts["README.md"]

    # import the copy as languini.projects.<name> from tmp_path and check it is its own project
    monkeypatch.setattr(languini.projects, "__path__", [*languini.projects.__path__, str(tmp_path)])
    original = languini.projects.load_project(source)
    monkeypatch.setattr(languini.projects, "PROJECTS_DIR", str(tmp_path))
    copy = languini.projects.load_project(name)
    cfg = copy.preset_config("mini")
    assert cfg.project == name
    assert set(copy.presets) == set(original.presets)
    assert cfg.h_dim == original.preset_config("mini").h_dim
    assert copy.Model.__module__ == f"languini.projects.{name}.model"
    for module in list(sys.modules):
        if module.startswith(f"languini.projects.{name}"):
            monkeypatch.delitem(sys.modules, module)


def test_refuses_to_overwrite(tmp_path):
    new_project.create_project("taken", "gpt", str(tmp_path))
    marker = tmp_path / "taken" / "model.py"
    marker.write_text("# my work\n")
    with pytest.raises(UserError, match="already exists"):
        new_project.create_project("taken", "gpt", str(tmp_path))
    assert marker.read_text() == "# my work\n"
    with pytest.raises(UserError, match="already exists"):
        new_project.create_project("lstm", "gpt")  # an existing project in place


@pytest.mark.parametrize("name", ["MyModel", "2fast", "my-model", "class", ""])
def test_rejects_bad_names(tmp_path, name):
    with pytest.raises(UserError, match="invalid project name"):
        new_project.create_project(name, "gpt", str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing half-made left behind


def test_unknown_source_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'gpt'"):
        new_project.create_project("fresh", "gtp", str(tmp_path))


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "languini.cli", "new-project", "Bad-Name", "--dest", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid project name") and "Traceback" not in proc.stderr


@pytest.fixture
def project_in_place():
    """A fresh project copied from gpt inside languini/projects; removed afterwards."""
    name = f"np_test_{os.getpid()}"
    folder = new_project.create_project(name, "gpt")
    try:
        yield name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_new_project_trains_and_evaluates(tmp_path, project_in_place):
    main_py = os.path.join(PROJECTS_DIR, project_in_place, "main.py")
    eval_py = os.path.join(PROJECTS_DIR, project_in_place, "eval.py")
    if not (os.path.exists(main_py) and os.path.exists(eval_py)):
        pytest.skip("the gpt project has no main.py/eval.py yet")
    data_root = str(tmp_path / "synth")
    make_synthetic_corpus(data_root)
    run_dir = tmp_path / "run"
    data = ["--data_root", data_root, "--dataset", "synth_256", "--vocab_size", "256"]
    train = [
        "nano", *data, "--seq_len", "32", "--train_batch_size", "4", "--eval_batch_size", "4",
        "--max_train_steps", "3", "--decay_steps", "3", "--warmup_steps", "1", "--eval_every", "0",
        "--max_eval_steps", "2", "--logger_type", "none", "--no-progress_bar", "--run_dir", str(run_dir),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = torchrun(main_py, train, nproc=1, env=env)
    assert proc.returncode == 0, output_tail(proc)
    with open(run_dir / "config.json") as f:
        assert json.load(f)["project"] == project_in_place
    steps = [json.loads(line).get("step") for line in open(run_dir / "metrics.jsonl")]
    assert max(steps) == 3

    evaluate = [
        sys.executable,
        eval_py,
        "--run_dir",
        str(run_dir),
        "--eval_data_split",
        "test",
        "--last_n",
        "16",
    ]
    proc = subprocess.run(evaluate, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, output_tail(proc)
    with open(run_dir / "eval" / "test.json") as f:
        result = json.load(f)
    assert result["checkpoint_step"] == 3 and result["n_tokens"] > 0 and result["loss"] > 0
