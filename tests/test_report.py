"""The comparison report: run collection, power-law fits, plots and warnings, on fabricated run folders."""

import json
import os

import numpy as np
import pytest

from languini.common_lib.errors import UserError
from languini.report_lib import report
from languini.report_lib.plots import curve_axis
from languini.report_lib.runs import find_run_dirs, git_revision, load_run, load_runs
from languini.report_lib.scaling import PowerLaw, crossing, fit_power_law

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, project="gpt", steps=100, tokens_per_second=0.0, dataset="demo_4096",
             vocab_size=4096, evals=None, batch=4, seq_len=32):  # fmt: skip
    """Write a small run folder the way the trainer and eval.py do; `evals` maps split -> normalised ppl."""
    run_dir = os.path.join(root, name)
    os.makedirs(os.path.join(run_dir, "eval"))
    config = dict(project=project, preset="nano", dataset=dataset, vocab_size=vocab_size, seq_len=seq_len,
                  train_batch_size=batch, max_train_steps=steps, tokens_per_second=tokens_per_second,
                  n_layers=1, h_dim=16, mlp_dim=32, head_dim=8, n_heads=2)  # fmt: skip
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, "env.json"), "w") as f:
        json.dump({"git_revision": "0123456789abcdef0123456789abcdef01234567+dirty", "torch_version": "x"}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(10, steps + 1, 10):
            tokens = step * batch * seq_len
            record = {"step": step, "tokens": tokens, "time": step * 0.1, "train/loss": 8.0 / np.sqrt(step)}
            if tokens_per_second:
                record["ref_gpu_hours"] = tokens / tokens_per_second / 3600
            f.write(json.dumps(record) + "\n")
            if step % 50 == 0:
                f.write(json.dumps({"step": step, "tokens": tokens, "eval/loss": 7.0 / np.sqrt(step)}) + "\n")
    for split, ppl in (evals or {}).items():
        result = dict(split=split, loss=2.0, ppl=7.4, normalised_loss=float(np.log(ppl)), normalised_ppl=ppl,
                      bits_per_byte=1.2, top1=0.3, top10=0.6, n_tokens=1000, n_chars=4000, n_bytes=4000,
                      last_n=128, protocol="sliding_window", checkpoint_step=steps)  # fmt: skip
        with open(os.path.join(run_dir, "eval", f"{split}.json"), "w") as f:
            json.dump(result, f)
    return run_dir


def assert_png(path):
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def set_eval_field(run_dir, split, **fields):
    path = os.path.join(run_dir, "eval", f"{split}.json")
    with open(path) as f:
        data = json.load(f)
    data.update(fields)
    with open(path, "w") as f:
        json.dump(data, f)


def test_power_law_fit_recovers_known_law():
    x = np.geomspace(6, 96, 5)
    law = fit_power_law(x, 31.7 * x**-0.083)
    assert law.a == pytest.approx(31.7, rel=1e-9) and law.b == pytest.approx(-0.083, rel=1e-9)
    noisy = 5.0 * x**-0.2 * np.exp(np.random.default_rng(0).normal(0, 0.01, len(x)))
    law = fit_power_law(x, noisy)
    assert law.a == pytest.approx(5.0, rel=0.1) and law.b == pytest.approx(-0.2, abs=0.03)


def test_power_law_rejects_unfittable_points():
    with pytest.raises(ValueError):
        fit_power_law([1.0, 1.0], [2.0, 3.0])
    with pytest.raises(ValueError):
        fit_power_law([1.0, 2.0], [-2.0, 3.0])


def test_crossing_of_two_laws():
    first, second = PowerLaw(10.0, -0.1), PowerLaw(20.0, -0.2)
    x, y = crossing(first, second)
    assert x == pytest.approx(2.0**10) and y == pytest.approx(first(x)) and y == pytest.approx(second(x))
    assert crossing(first, PowerLaw(3.0, -0.1)) is None


def test_report_of_two_runs(tmp_path):
    runs_root = tmp_path / "runs"
    a = make_run(
        runs_root, "gpt_small", steps=100, tokens_per_second=2e3, evals={"test": 3.14159, "java": 5.5}
    )
    b = make_run(runs_root, "gpt_big", steps=200, tokens_per_second=2e3, evals={"test": 2.71828})
    out = tmp_path / "report"
    assert report.main([a, b, "--out", str(out)]) == 0

    for name in ("curves_tokens.png", "curves_ref_gpu_hours.png", "scaling.png"):
        assert_png(out / name)
    data = json.loads((out / "report.json").read_text())
    rows = {row["run"]: row for row in data["runs"]}
    for run_dir in (a, b):
        row = rows[os.path.basename(run_dir)]
        for split in ("test", "java"):
            path = os.path.join(run_dir, "eval", f"{split}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    assert row["normalised_ppl"][split] == json.load(f)["normalised_ppl"]
    assert rows["gpt_big"]["tokens"] == 200 * 4 * 32
    assert rows["gpt_big"]["ref_gpu_hours"] == pytest.approx(200 * 4 * 32 / 2e3 / 3600)

    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| gpt_")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in table}
    header = [
        c.strip() for c in next(line for line in md.splitlines() if line.startswith("| run")).split("|")[1:-1]
    ]
    small = dict(zip(header, cells["gpt_small"]))
    assert float(small["norm. ppl test"]) == pytest.approx(3.14159, abs=5e-5)
    assert float(small["norm. ppl java"]) == pytest.approx(5.5, abs=5e-5)
    assert dict(zip(header, cells["gpt_big"]))["norm. ppl java"] == "–"
    assert small["git"] == "0123456789+dirty"
    # both runs are gpt at two compute levels: one law, through both points exactly
    law = data["scaling"]["laws"]["gpt"]
    assert data["scaling"]["x"] == "ref_gpu_hours"
    assert law["a"] * rows["gpt_big"]["ref_gpu_hours"] ** law["b"] == pytest.approx(2.71828)
    assert not any("different" in w for w in data["warnings"])


def test_scaling_fit_per_project_and_crossing(tmp_path):
    gpt = {100: 4.0, 200: 3.6, 400: 3.3}
    lstm = {100: 5.0, 200: 4.2, 400: 3.6}
    dirs = [
        make_run(tmp_path, f"gpt{s}", steps=s, tokens_per_second=1e3, evals={"test": p})
        for s, p in gpt.items()
    ]
    dirs += [make_run(tmp_path, f"lstm{s}", project="lstm", steps=s, tokens_per_second=1e3, evals={"test": p})
             for s, p in lstm.items()]  # fmt: skip
    data = report.build_report(load_runs(dirs), str(tmp_path / "out"))
    laws = {p: PowerLaw(**v) for p, v in data["scaling"]["laws"].items()}
    hours = np.array(list(gpt)) * 4 * 32 / 1e3 / 3600
    expected = fit_power_law(hours, list(gpt.values()))
    assert laws["gpt"].b == pytest.approx(expected.b) and laws["gpt"].a == pytest.approx(expected.a)
    (cross,) = data["scaling"]["crossings"]
    assert laws["gpt"](cross["x"]) == pytest.approx(laws["lstm"](cross["x"]))
    assert "cross at" in (tmp_path / "out" / "report.md").read_text()
    assert_png(tmp_path / "out" / "scaling.png")


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(dataset="books_16384"), "different datasets"),
        (dict(vocab_size=16384), "different vocabularies"),
        ("last_n", "different last_n"),
        ("protocol", "different eval protocols"),
    ],
)
def test_mismatch_warnings(tmp_path, change, expected):
    a = make_run(tmp_path, "a", evals={"test": 3.0})
    if change == "last_n":
        b = make_run(tmp_path, "b", evals={"test": 3.0})
        set_eval_field(b, "test", last_n=64)
    elif change == "protocol":
        b = make_run(tmp_path, "b", evals={"test": 3.0})
        set_eval_field(b, "test", protocol="recurrent")
    else:
        b = make_run(tmp_path, "b", evals={"test": 3.0}, **change)
    warnings = report.comparison_warnings(load_runs([a, b]))
    assert len(warnings) == 1 and expected in warnings[0], warnings
    assert report.comparison_warnings(load_runs([a])) == []


def test_partial_and_missing_files_give_warnings(tmp_path):
    run_dir = make_run(tmp_path, "crashed", steps=100)
    os.unlink(os.path.join(run_dir, "env.json"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 110, "tokens": 14')  # a write cut short
    run = load_run(run_dir)
    assert run.steps == 100 and run.git_revision == "?" and run.evals == {}
    assert any("no env.json" in w for w in run.warnings)
    assert any("incomplete" in w for w in run.warnings)
    assert any("no evaluation results" in w for w in run.warnings)
    data = report.build_report([run], str(tmp_path / "out"))
    assert "no env.json" in " ".join(data["warnings"])
    assert_png(tmp_path / "out" / "curves_tokens.png")


def test_resumed_metrics_keep_the_last_record_of_each_step(tmp_path):
    run_dir = make_run(tmp_path, "resumed", steps=30)
    # killed after logging step 30, resumed from the checkpoint of step 20: steps 30.. are logged again
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        for step in (30, 40):
            f.write(json.dumps({"step": step, "tokens": step * 128, "train/loss": 1.0}) + "\n")
    steps, losses = load_run(run_dir).series("train/loss", x="step")
    assert steps.tolist() == [10, 20, 30, 40] and losses[-2:].tolist() == [1.0, 1.0]


def test_hours_axis_falls_back_to_tokens_without_throughput(tmp_path):
    a = make_run(tmp_path, "a", tokens_per_second=0.0, evals={"test": 3.0})
    runs = load_runs([a, make_run(tmp_path, "b", steps=200, tokens_per_second=0.0, evals={"test": 2.5})])
    x, note = curve_axis(runs, "ref_gpu_hours")
    assert x == "tokens" and "tokens_per_second" in note
    points, x, note = report.scaling_points(runs, "test")
    assert x == "tokens" and sorted(points["gpt"][0].tolist()) == [100 * 128, 200 * 128]
    data = report.build_report(runs, str(tmp_path / "out"))
    assert data["runs"][0]["ref_gpu_hours"] is None
    assert "falls back to tokens" in (tmp_path / "out" / "report.md").read_text()


def test_find_runs_below_a_folder_and_clear_errors(tmp_path):
    make_run(tmp_path / "runs" / "gpt", "x")
    make_run(tmp_path / "runs" / "lstm", "x", project="lstm")
    found = find_run_dirs([str(tmp_path / "runs")])
    assert [os.path.relpath(p, tmp_path) for p in found] == ["runs/gpt/x", "runs/lstm/x"]
    assert [r.name for r in load_runs([str(tmp_path / "runs")])] == ["gpt/x", "lstm/x"]
    with pytest.raises(UserError):
        find_run_dirs([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "empty")])
    assert exc.value.code == 2


def test_params_counted_on_meta_device_match_the_model(tmp_path):
    from languini.projects.gpt.configs import Config
    from languini.projects.gpt.model import Model

    run = load_run(make_run(tmp_path, "a"))
    model = Model(Config(**{k: v for k, v in run.config.items() if k in Config.__dataclass_fields__}))
    assert run.n_params == sum(p.numel() for p in model.parameters())


def test_git_revision_formats():
    assert git_revision({"git_revision": "0123456789abcdef0123456789abcdef01234567"}) == "0123456789"
    assert git_revision({"git_revision": "unknown"}) == "unknown"
    assert git_revision({}) == "?"
