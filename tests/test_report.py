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


def update_json(path, **fields):
    with open(path) as f:
        data = json.load(f)
    data.update(fields)
    with open(path, "w") as f:
        json.dump(data, f)


def set_config_field(run_dir, **fields):
    update_json(os.path.join(run_dir, "config.json"), **fields)


def set_eval_field(run_dir, split, **fields):
    update_json(os.path.join(run_dir, "eval", f"{split}.json"), **fields)


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
    laws = {p: PowerLaw(v["a"], v["b"]) for p, v in data["scaling"]["laws"].items()}
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
        ("eval_streams", "different eval_streams"),
        ("max_tokens", "different max_tokens"),
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
    elif change in ("eval_streams", "max_tokens"):
        b = make_run(tmp_path, "b", evals={"test": 3.0})
        set_eval_field(b, "test", **{change: 8})
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
    points, _, x, note = report.scaling_points(runs, "test", x="tokens")
    assert x == "tokens" and sorted(points["gpt"][0].tolist()) == [100 * 128, 200 * 128]
    points, _, x, note = report.scaling_points(runs, "test")  # auto: training FLOPs without a throughput
    assert x == "flops" and "compute is training FLOPs" in note
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


# ---- FLOPs axis, honest fits, markers --------------------------------------------------------------------


def test_flops_axis_is_tokens_times_counted_flops_per_token(tmp_path):
    from languini.projects import load_project
    from languini.tools.flops import count_step_flops

    run = load_run(make_run(tmp_path, "a", evals={"test": 3.0}))
    cfg = load_project("gpt").config_from_dict(run.config)
    per_token = count_step_flops("gpt", cfg).forward_backward_per_token
    xs, _ = run.series("train/loss", x="flops")
    tokens, _ = run.series("train/loss", x="tokens")
    assert run.flops_per_token == per_token > 0
    assert xs.tolist() == (tokens * per_token).tolist()
    assert run.training_flops == run.tokens * per_token
    points, _, x, _ = report.scaling_points([run], "test", x="flops")
    assert x == "flops" and points["gpt"][0].tolist() == [run.tokens * per_token]
    data = report.build_report([run], str(tmp_path / "out"), x="flops")
    assert data["runs"][0]["training_flops"] == run.tokens * per_token
    assert_png(tmp_path / "out" / "curves_flops.png")


def test_a_law_through_two_points_says_so(tmp_path):
    dirs = [make_run(tmp_path, f"g{s}", steps=s, evals={"test": p}) for s, p in ((100, 4.0), (200, 3.5))]
    data = report.build_report(load_runs(dirs), str(tmp_path / "out"))
    assert data["scaling"]["laws"]["gpt"]["compute_levels"] == 2
    assert any("fitted through 2 compute levels only" in w for w in data["warnings"])
    assert "2 points only: not a trend" in (tmp_path / "out" / "report.md").read_text()
    dirs.append(make_run(tmp_path, "g400", steps=400, evals={"test": 3.2}))
    data = report.build_report(load_runs(dirs), str(tmp_path / "out3"))
    assert not any("2 compute levels" in w for w in data["warnings"])


def test_laws_are_fitted_per_dataset_and_never_crossed_between_datasets(tmp_path):
    dirs = []
    for dataset, ppls in (("demo_4096", (4.0, 3.6, 3.3)), ("books_4096", (9.0, 8.0, 7.5))):
        dirs += [make_run(tmp_path, f"{dataset}_{s}", steps=s, dataset=dataset, evals={"test": p})
                 for s, p in zip((100, 200, 400), ppls)]  # fmt: skip
    dirs += [make_run(tmp_path, f"lstm_{s}", project="lstm", steps=s, evals={"test": p})
             for s, p in zip((100, 200, 400), (5.0, 4.2, 3.6))]  # fmt: skip
    runs = load_runs(dirs)
    data = report.build_report(runs, str(tmp_path / "out"))
    laws = data["scaling"]["laws"]
    assert set(laws) == {"gpt · demo_4096", "gpt · books_4096", "lstm · demo_4096"}
    points, _, _, _ = report.scaling_points(runs, "test")
    demo = fit_power_law(*points["gpt · demo_4096"])
    assert laws["gpt · demo_4096"]["b"] == pytest.approx(demo.b)
    assert [c["projects"] for c in data["scaling"]["crossings"]] == [["gpt · demo_4096", "lstm · demo_4096"]]
    for dataset in ("demo_4096", "books_4096"):
        assert_png(tmp_path / "out" / f"scaling_{dataset}.png")


def test_eval_settings_are_fitted_apart_and_crossings_marked_extrapolated(tmp_path):
    gpt = [make_run(tmp_path, f"g{s}", steps=s, evals={"test": p}) for s, p in ((100, 4.0), (200, 3.6), (400, 3.3))]
    lstm = [make_run(tmp_path, f"l{s}", project="lstm", steps=s, evals={"test": p})
            for s, p in ((100, 5.0), (200, 4.5), (400, 4.1))]  # fmt: skip
    for run_dir in lstm:
        set_eval_field(run_dir, "test", protocol="stateful", last_n=None, eval_streams=4)
    data = report.build_report(load_runs(gpt + lstm), str(tmp_path / "out"))
    assert set(data["scaling"]["laws"]) == {"gpt · sliding_window last_n 128", "lstm · stateful 4 streams"}
    assert any("different eval protocols and last_n and eval_streams" in w for w in data["warnings"])
    (cross,) = data["scaling"]["crossings"]
    assert cross["inside"] is False
    md = (tmp_path / "out" / "report.md").read_text()
    assert "outside the measured range (extrapolated)" in md and "Eval settings differ" in md
    capped = make_run(tmp_path, "capped", steps=800, evals={"test": 3.0})
    set_eval_field(capped, "test", max_tokens=1000)
    data = report.build_report(load_runs(gpt + [capped]), str(tmp_path / "out2"))
    assert data["runs"][-1]["eval_setting"]["test"] == "sliding_window last_n 128, first 1,000 tokens"
    assert list(data["scaling"]["laws"]) == ["gpt · sliding_window last_n 128"]  # the capped run stays apart


def test_one_validation_value_per_step_and_readable_log_ticks(tmp_path):
    from languini.report_lib.plots import log_tick_subs, tick_label

    run_dir = make_run(tmp_path, "a", steps=100, evals={"test": 3.0})
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 100, "tokens": 100 * 128, "eval/loss": 0.5}) + "\n")
    steps, values = load_run(run_dir).series("eval/loss", x="step")
    assert steps.tolist() == [50, 100] and values[-1] == 0.5
    for low, high in ((2.0, 3.0), (1.0, 9.0), (1.0, 300.0), (1e9, 1e17), (1e-3, 1e30)):
        subs, every = log_tick_subs(low, high)
        decades = np.log10(high / low)
        assert len(subs) * (decades + 1) / every <= 12
    assert [tick_label(v) for v in (0.02, 5, 300, 2e4, 1e15)] == ["0.02", "5", "300", "2e4", "1e15"]
    # ticks between powers of ten keep their digit: 1.5e12 is not "2e12", 2.5 is not "2"
    assert [tick_label(v) for v in (1.5e12, 3e12, 2.5, 0.15)] == ["1.5e12", "3e12", "2.5", "0.15"]


def test_optimisers_are_separate_series_and_one_budget_gets_a_readable_axis(tmp_path):
    from languini.report_lib.plots import plot_scaling, scaling_x_range

    adam = [make_run(tmp_path, f"adam{s}", steps=s, evals={"test": p}) for s, p in ((100, 5.0), (200, 4.5))]
    muon = [make_run(tmp_path, f"muon{s}", steps=s, evals={"test": p}) for s, p in ((100, 4.8), (200, 4.2))]
    for run_dir in muon:
        set_config_field(run_dir, optimizer="muon")
    data = report.build_report(load_runs(adam + muon), str(tmp_path / "out"))
    assert set(data["scaling"]["laws"]) == {"gpt", "gpt + muon"}
    assert [r["model"] for r in data["runs"]] == ["gpt", "gpt", "gpt + muon", "gpt + muon"]
    assert "| muon100 | gpt + muon | nano |" in (tmp_path / "out" / "report.md").read_text()
    # runs at (nearly) one budget: the axis spans 1.5x each side, not just their rounding differences
    points = {"a": (np.array([2.99e12, 3.0e12]), np.array([7.0, 6.8]))}
    low, high, _ = scaling_x_range(points, [])
    assert low == pytest.approx(2.99e12 / 1.5) and high == pytest.approx(4.5e12)
    assert plot_scaling(points, {}, [], str(tmp_path / "one_budget.png"), "FLOPs") == ["a"]
    assert_png(str(tmp_path / "one_budget.png"))
    # a law always runs on dotted past its points, so the legend says what dotted means, crossing or not
    points = {"b": (np.array([1e12, 2e12, 4e12]), np.array([7.0, 6.0, 5.2]))}
    laws = {"b": fit_power_law(*points["b"])}
    labels = plot_scaling(points, laws, [], str(tmp_path / "law.png"), "FLOPs")
    assert "dotted: extrapolated beyond the measured range" in labels and len(labels) == 3


def test_the_law_is_fitted_to_the_best_run_per_compute_level(tmp_path):
    """A sweep's weaker runs at one compute level must neither pull the law nor move a crossing."""
    from languini.report_lib.scaling import best_per_level, compute_levels

    xs, ys = best_per_level([1.0, 2.0, 1.02, 2.05, 4.0], [5.0, 4.0, 4.5, 4.6, 3.5])
    assert xs.tolist() == [1.02, 2.0, 4.0] and ys.tolist() == [4.5, 4.0, 3.5]
    assert compute_levels([1.0, 1.04, 2.0, 2.2, 8.0]) == 4

    best = [make_run(tmp_path, f"g{s}", steps=s, evals={"test": p}) for s, p in ((100, 4.0), (200, 3.5), (400, 3.2))]
    weak = [make_run(tmp_path, f"w{s}", steps=s, evals={"test": p}) for s, p in ((100, 6.0), (200, 5.5))]
    alone = report.build_report(load_runs(best), str(tmp_path / "best"))["scaling"]["laws"]["gpt"]
    data = report.build_report(load_runs(best + weak), str(tmp_path / "all"))
    law = data["scaling"]["laws"]["gpt"]
    assert (law["a"], law["b"], law["compute_levels"]) == (alone["a"], alone["b"], 3)
    assert any("best run at each of its 3 compute levels; 2 other run(s)" in w for w in data["warnings"])
