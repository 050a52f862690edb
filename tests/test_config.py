import json

import pytest

from languini.common_lib.config import load_config_json, parse_config, save_config
from languini.common_lib.errors import UserError
from languini.projects import load_project
from languini.projects.gpt import configs as gpt_configs


def parse(argv, mod=gpt_configs):
    return parse_config(mod.Config, mod.PRESETS, argv, "main.py", mod.DEFAULT_PRESET)


def test_default_preset_is_mini():
    cfg = parse([])
    assert (cfg.preset, cfg.n_layers, cfg.h_dim, cfg.n_heads) == ("mini", 4, 512, 8)


def test_preset_then_typed_flags():
    cfg = parse(["tiny", "--h_dim", "666", "--max_lr=1e-3", "--no-progress_bar", "--debug", "--max_train_steps", "50_000"])
    assert cfg.preset == "tiny" and cfg.n_layers == 4 and cfg.h_dim == 666
    assert cfg.max_lr == 1e-3 and cfg.progress_bar is False and cfg.debug is True
    assert cfg.max_train_steps == 50000 and isinstance(cfg.max_train_steps, int)


def test_preset_config_is_stamped_with_the_project_and_preset():
    c = load_project("lstm").preset_config("tiny")
    assert c.block_length == 8 and c.project == "lstm" and c.preset == "tiny"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["minii"], "did you mean 'mini'"),
        (["--h_dm", "3"], "did you mean '--h_dim'"),
        (["--h_dim", "big"], "--h_dim expects int"),
        (["--precision", "bf17"], "did you mean 'bf16'"),
        (["--h_dim"], "needs a value"),
        (["mini", "extra"], "unexpected argument"),
    ],
)
def test_mistakes_give_one_clear_line(argv, fragment):
    with pytest.raises(UserError) as e:
        parse(argv)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="valid: nano, mini, tiny, small, medium, large, XL"):
        parse(["huge"])


def test_json_round_trip(tmp_path):
    cfg = parse(["small", "--seed", "3"])
    save_config(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["n_layers"] == 12
    assert load_config_json(gpt_configs.Config, tmp_path / "config.json") == cfg


def test_cli_exit_code_and_no_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "languini.cli", "trian"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown command 'trian' (did you mean 'train'?)")
    assert "Traceback" not in r.stderr


def test_max_train_steps_alone_sets_the_decay_too():
    assert (parse(["nano", "--max_train_steps", "200"]).decay_steps) == 200
    assert parse(["nano", "--max_train_steps", "200", "--decay_steps", "500"]).decay_steps == 500
    assert parse(["nano", "--decay_steps", "300"]).max_train_steps == 1000  # only this direction
    assert parse(["nano"]).decay_steps == 1000


def test_a_boolean_given_a_value_says_how_switches_work():
    with pytest.raises(UserError, match="write --progress_bar or --no-progress_bar"):
        parse(["nano", "--progress_bar", "False"])


def test_a_run_of_another_project_is_named_before_its_unknown_fields(tmp_path):
    """An LSTM run's config has fields GPT lacks; the message must say whose run it is, not list the fields."""
    path = tmp_path / "config.json"
    save_config(load_project("lstm").preset_config("nano"), path)
    with pytest.raises(UserError, match="is a run of project 'lstm', not 'gpt'.*projects/lstm/eval.py"):
        load_project("gpt").load_run_config(str(path))
    path.write_text('{"project": "gpt", ')
    with pytest.raises(UserError, match="is not a readable config"):
        load_project("gpt").load_run_config(str(path))


def test_a_switch_given_a_value_is_refused_in_its_own_words():
    with pytest.raises(UserError, match="--no-progress_bar takes no value"):
        parse_config(gpt_configs.Config, gpt_configs.PRESETS, ["--no-progress_bar=1"], "main.py")
