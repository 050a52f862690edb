"""The project contract, checked for every folder under languini/projects/ found at collection time.

A new project folder (a `languini new-project` copy or a plain `cp -r`) is covered with no test written:
each test id names the project, and each failure message names the rule that was broken (the rules are
written down in docs/architecture.md).
"""

import dataclasses
import json
import math
import os
import shutil
import sys

import pytest
import torch
from helpers import exit_code, make_synthetic_corpus, train_losses

import languini.projects
from languini.projects import list_projects, load_project
from languini.train_lib.checkpoint import clean_state_dict
from languini.train_lib.compile import compile_model
from languini.train_lib.eval_command import run_eval
from languini.train_lib.project_spec import LanguageModel, spec_problems
from languini.train_lib.train_command import run_training

PROJECTS = list_projects()
VOCAB = 256  # the synthetic corpus' vocabulary


def tiny_config(spec, **overrides):
    """The project's nano preset on the synthetic corpus: small enough for a CPU test."""
    return dataclasses.replace(
        spec.preset_config("nano"), vocab_size=VOCAB, dataset="synth_256", device="cpu", **overrides
    )


def build(spec, cfg, dtype=torch.float64):
    torch.manual_seed(0)
    return spec.Model(cfg).to(dtype).eval()


def tokens(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=PROJECTS)
def spec(request):
    return load_project(request.param)


def test_spec_follows_the_contract(spec):
    assert spec_problems(spec) == [], f"project {spec.name}: project.py's SPEC breaks the contract"
    assert spec.preset_config("nano").project == spec.name, "configs carry the folder's name"


def test_every_preset_builds_on_the_meta_device(spec):
    for preset in spec.presets:
        with torch.device("meta"):
            model = spec.Model(spec.preset_config(preset))
        assert isinstance(model, LanguageModel), f"{spec.name} {preset}: Model lacks forward/get_init_state"
        assert sum(p.numel() for p in model.parameters()) > 0


def test_forward_returns_logits_for_every_position(spec):
    cfg = tiny_config(spec)
    model = build(spec, cfg)
    x = tokens(2, cfg.seq_len)
    logits, _ = model(x, model.get_init_state(2, "cpu"))
    assert logits.shape == (2, cfg.seq_len, VOCAB), f"{spec.name}: forward must return [batch, time, vocab]"
    assert torch.isfinite(logits).all()


def test_logits_never_see_the_future(spec):
    cfg = tiny_config(spec)
    model = build(spec, cfg)
    x = tokens(1, cfg.seq_len)
    t = cfg.seq_len // 2
    changed = x.clone()
    changed[:, t:] = tokens(1, cfg.seq_len - t, seed=1)
    with torch.no_grad():
        before, _ = model(x, model.get_init_state(1, "cpu"))
        after, _ = model(changed, model.get_init_state(1, "cpu"))
    torch.testing.assert_close(
        after[:, :t], before[:, :t], rtol=0, atol=1e-12, msg=f"{spec.name}: changing token {t} changed earlier logits"
    )
    assert not torch.allclose(after[:, t:], before[:, t:]), f"{spec.name}: the changed tokens had no effect"


def test_carried_state_equals_one_long_call(spec):
    """Stateful models: forward on L tokens, then L more with the returned state == forward on 2L tokens."""
    cfg = tiny_config(spec)
    model = build(spec, cfg)
    if spec.eval_protocol != "stateful":
        assert model.get_init_state(2, "cpu") is None, f"{spec.name}: a stateless model's init state is None"
        return
    half = cfg.seq_len // 2
    x = tokens(2, 2 * half)
    with torch.no_grad():
        whole, _ = model(x, model.get_init_state(2, "cpu"))
        first, state = model(x[:, :half], model.get_init_state(2, "cpu"))
        second, _ = model(x[:, half:], state)
    torch.testing.assert_close(
        torch.cat([first, second], 1), whole, rtol=1e-9, atol=1e-9,
        msg=f"{spec.name}: two calls with the carried state differ from one call",
    )  # fmt: skip


def test_checkpoint_names_are_the_plain_model_names(spec):
    model = spec.Model(tiny_config(spec))
    names = set(model.state_dict())
    assert set(clean_state_dict(model.state_dict())) == names, f"{spec.name}: parameter names hold wrapper parts"
    compiled = compile_model(spec.Model(tiny_config(spec)), "default")  # compiles lazily: nothing runs here
    assert set(clean_state_dict(compiled.state_dict())) == names, f"{spec.name}: compile changes checkpoint names"


def tiny_run_flags(data_root, run_dir):
    return [
        "nano", "--data_root", data_root, "--dataset", "synth_256", "--vocab_size", str(VOCAB),
        "--train_batch_size", "2", "--eval_batch_size", "2", "--test_batch_size", "4", "--max_train_steps", "2",
        "--decay_steps", "2", "--warmup_steps", "1", "--eval_every", "0", "--log_metrics_every", "1",
        "--log_grads_every", "0", "--logger_type", "none", "--no-progress_bar", "--device", "cpu",
        "--run_dir", run_dir,
    ]  # fmt: skip


def test_trains_two_steps_and_evaluates_on_cpu(spec, tmp_path):
    data_root = str(tmp_path / "data")
    make_synthetic_corpus(data_root, splits={"train": [900, 700, 800], "test": [300, 200]})
    run_dir = str(tmp_path / "run")
    assert run_training(spec, tiny_run_flags(data_root, run_dir)) == 0, f"{spec.name}: training failed"
    assert sorted(train_losses(run_dir)) == [1, 2]
    assert run_eval(spec, ["--run_dir", run_dir, "--last_n", "8"]) == 0, f"{spec.name}: eval.py failed"
    with open(os.path.join(run_dir, "eval", "test.json")) as f:
        result = json.load(f)
    assert result["protocol"] == spec.eval_protocol and math.isfinite(result["loss"])


# ---------------------------------------------------------------------------------------------------
# A folder copied by hand is its own project


UNIFORM_MODEL = """

class Model(Model):  # appended by the test: every logit 0, so the loss is exactly ln(vocab)
    def forward(self, x, state=None):
        logits, state = super().forward(x, state)
        return logits * 0, state
"""


@pytest.fixture
def hand_copy(tmp_path, monkeypatch):
    """`cp -r languini/projects/gpt PROJECTS/handcopy` (no renaming), then an edit to handcopy/model.py;
    PROJECTS is a temporary projects folder that also holds gpt, so nothing is written into the repo."""
    projects = tmp_path / "projects"
    shutil.copytree(os.path.join(languini.projects.PROJECTS_DIR, "gpt"), projects / "gpt")
    shutil.copytree(projects / "gpt", projects / "handcopy")
    with open(projects / "handcopy" / "model.py", "a") as f:
        f.write(UNIFORM_MODEL)
    monkeypatch.setattr(languini.projects, "PROJECTS_DIR", str(projects))
    monkeypatch.setattr(languini.projects, "__path__", [str(projects), *languini.projects.__path__])
    for name in [m for m in sys.modules if m.startswith("languini.projects.")]:
        monkeypatch.delitem(sys.modules, name)  # import the copies from the temporary folder
    return projects / "handcopy"


def _import_script(path, name):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_hand_copied_folder_trains_and_evaluates_its_own_model(hand_copy, tmp_path):
    assert list_projects() == ["gpt", "handcopy"]
    data_root = str(tmp_path / "data")
    make_synthetic_corpus(data_root, splits={"train": [900, 700, 800], "test": [300, 200]})
    run_dir = str(tmp_path / "run")
    main = _import_script(hand_copy / "main.py", "handcopy_main")
    evaluate = _import_script(hand_copy / "eval.py", "handcopy_eval")
    assert main.main(tiny_run_flags(data_root, run_dir)) == 0
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["project"] == "handcopy"
    assert list(train_losses(run_dir).values()) == pytest.approx([math.log(VOCAB)] * 2)  # the copy's model trained
    assert evaluate.main(["--run_dir", run_dir, "--last_n", "8"]) == 0
    with open(os.path.join(run_dir, "eval", "test.json")) as f:
        assert json.load(f)["loss"] == pytest.approx(math.log(VOCAB), abs=1e-6)  # and its model was scored

    gpt_eval = _import_script(hand_copy.parent / "gpt" / "eval.py", "gpt_eval_copy")
    assert exit_code(gpt_eval.main, ["--run_dir", run_dir]) == 2  # another project's eval.py refuses the run
