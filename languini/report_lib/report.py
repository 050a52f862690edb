"""`languini report RUN_DIR... [--out DIR] [--split S] [--x auto|ref_gpu_hours|flops|tokens]`: compare runs.

Writes DIR/report.md (one row per run: project, preset, compute, training FLOPs, steps, tokens, parameters,
normalised perplexity of every evaluated split, git revision), DIR/report.json (the same numbers,
unrounded), learning curves over tokens, training FLOPs and reference-GPU hours, and normalised perplexity
against compute on log-log axes with a power law fitted per series (project, dataset and eval setting; one
plot per dataset) and the points where two laws of one dataset cross (the paper's way of comparing scaling
trends). Warns when the runs compared differ in dataset, vocabulary or eval setting (protocol, last_n,
eval_streams, max_tokens), and when a law rests on two points only. A --split no run was evaluated on, or
a forced --x that a run cannot give, is refused in one line before anything is written.
"""

import datetime
import hashlib
import itertools
import json
import os
import re
import sys

import numpy as np

from languini.common_lib.atomic_io import atomic_write_json, atomic_write_text
from languini.common_lib.errors import OneLineArgumentParser, UserError, exit_on_user_error
from languini.common_lib.suggest import did_you_mean
from languini.dataset_lib.layout import is_safe_name, path_inside
from languini.report_lib.plots import EXTRAPOLATE_LIMIT, X_LABELS, plot_learning_curves, plot_scaling
from languini.report_lib.runs import Run, eval_setting, load_runs, setting_label
from languini.report_lib.scaling import best_per_level, compute_levels, crossing, fit_power_law
from languini.tools.compute_classes import COMPUTE_CLASS_HOURS

CURVES_TOKENS = "curves_tokens.png"
CURVES_HOURS = "curves_ref_gpu_hours.png"
CURVES_FLOPS = "curves_flops.png"
SCALING = "scaling.png"
SETTING_FIELDS = ("eval protocols", "last_n", "eval_streams", "max_tokens")  # the parts of eval_setting


def ordered_splits(runs: list[Run]) -> list[str]:
    """Every evaluated split, `test` first."""
    splits = {s for r in runs for s in r.evals}
    return sorted(splits, key=lambda s: (s != "test", s))


def _group(values: dict[str, object]) -> str:
    by_value: dict[str, list[str]] = {}
    for name, value in values.items():
        by_value.setdefault(repr(value), []).append(name)
    return "; ".join(f"{v} ({', '.join(names)})" for v, names in by_value.items())


def _differs(what: str, values: dict[str, object]) -> list[str]:
    return (
        [f"runs used different {what}: {_group(values)}"] if len(set(map(repr, values.values()))) > 1 else []
    )


def comparison_warnings(runs: list[Run]) -> list[str]:
    """Why the runs' numbers may not be comparable: dataset, vocabulary or eval setting differ. One line
    per split whose results were scored under more than one eval setting, naming the parts that differ."""
    warnings = _differs("datasets", {r.name: r.dataset for r in runs if r.dataset is not None})
    warnings += _differs("vocabularies", {r.name: r.vocab_size for r in runs if r.vocab_size is not None})
    for split in ordered_splits(runs):
        settings = {r.name: eval_setting(r.evals[split]) for r in runs if split in r.evals}
        if len(set(settings.values())) < 2:
            continue
        fields = [f for i, f in enumerate(SETTING_FIELDS) if len({s[i] for s in settings.values()}) > 1]
        groups = _group({name: setting_label(s) for name, s in settings.items()}).replace("'", "")
        warnings.append(
            f"runs used different {' and '.join(fields)} on split '{split}': {groups}; their numbers are not "
            "directly comparable, so the scaling plot fits each setting separately"
        )
    return warnings


def split_warnings(runs: list[Run], split: str) -> list[str]:
    """Refuse a --split that no run was evaluated on, naming the splits they were; warn about the runs
    without it when others have it. Runs not evaluated at all have a warning of their own."""
    splits = ordered_splits(runs)
    if splits and split not in splits:
        raise UserError(f"no run has results on split '{split}'{did_you_mean(split, splits)}; "
                        f"the runs have: {', '.join(splits)}")
    missing = [r.name for r in runs if r.evals and split not in r.evals]
    return [f"no result on split '{split}' for {', '.join(missing)}: not in the scaling plot"] if missing else []


def run_warnings(run: Run) -> list[str]:
    """Unfinished training, or an evaluation of another checkpoint than the last one logged."""
    warnings = []
    if run.planned_steps and 0 < run.steps < run.planned_steps:
        warnings.append(
            f"{run.name}: stopped at step {run.steps} of {run.planned_steps} (still training or interrupted)"
        )
    for split, e in run.evals.items():
        step = e.get("checkpoint_step")
        if step is not None and run.steps and step != run.steps:
            warnings.append(
                f"{run.name}: eval/{split}.json scored the checkpoint of step {step}, "
                f"but training logged {run.steps} steps"
            )
    return warnings


def run_row(run: Run, splits: list[str]) -> dict:
    """The numbers of one table row (unrounded)."""
    return {
        "run": run.name,
        "path": run.path,
        "project": run.project,
        "model": run.model,
        "preset": run.preset,
        "ref_gpu_hours": run.ref_gpu_hours,
        "tokens_per_second": run.tokens_per_second,
        "steps": run.steps,
        "planned_steps": run.planned_steps,
        "tokens": run.tokens,
        "flops_per_token": run.flops_per_token,
        "training_flops": run.training_flops,
        "params": run.n_params,
        "dataset": run.dataset,
        "vocab_size": run.vocab_size,
        "normalised_ppl": {s: run.evals[s].get("normalised_ppl") for s in splits if s in run.evals},
        "eval_setting": {s: setting_label(eval_setting(run.evals[s])) for s in splits if s in run.evals},
        "git_revision": run.git_revision,
    }


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))


def scaling_axis(scored: list[Run], x: str = "auto") -> tuple[str, str]:
    """The compute axis of the scaling plot and a note when `auto` had to fall back: reference-GPU hours when
    every run has a throughput, else training FLOPs, else tokens seen. An asked axis is forced: a run that
    lacks what it needs is an error naming the run."""
    no_throughput = [r.name for r in scored if r.tokens_per_second <= 0]
    no_flops = [r.name for r in scored if r.flops_per_token is None]
    if x == "ref_gpu_hours" and no_throughput:
        raise UserError(
            f"--x ref_gpu_hours needs every run's reference throughput, but tokens_per_second is 0 for "
            f"{', '.join(no_throughput)}: train with --tokens_per_second N (`languini steps` prints it) or set "
            "it in the run's config.json; or use --x flops"
        )
    if x == "flops" and no_flops:
        raise UserError(f"--x flops needs every run's FLOP count, but it cannot be counted for {', '.join(no_flops)} "
                        "(their project's model cannot be built); use --x tokens")
    if x != "auto":
        return x, ""
    if not no_throughput:
        return "ref_gpu_hours", ""
    if not no_flops:
        return "flops", f"tokens_per_second is 0 for {', '.join(no_throughput)}: compute is training FLOPs"
    return "tokens", f"no throughput or FLOP count for {', '.join(no_flops)}: compute falls back to tokens seen"


def scored_runs(runs: list[Run], split: str) -> list[Run]:
    """The runs with a training budget and a normalised perplexity on `split`: the scaling plot's points."""
    return [r for r in runs if r.tokens > 0 and _is_finite(r.evals.get(split, {}).get("normalised_ppl"))]


def scaling_points(runs: list[Run], split: str, x: str = "auto"):
    """Per series, (compute, normalised ppl on `split`) of each evaluated run. A series is one project (and
    optimiser, see Run.model) on one dataset under one eval setting: a law is never fitted across datasets or settings. Returns
    (points, series -> (dataset, eval setting), x key, note)."""
    scored = scored_runs(runs, split)
    x, note = scaling_axis(scored, x)
    datasets = {r.dataset for r in scored}
    settings = {eval_setting(r.evals[split]) for r in scored}
    points: dict[str, tuple[list, list]] = {}
    meta: dict[str, tuple] = {}
    for r in scored:
        setting = eval_setting(r.evals[split])
        label = r.model
        if len(datasets) > 1:
            label += f" · {r.dataset}"
        if len(settings) > 1:
            label += f" · {setting_label(setting)}"
        xs, ys = points.setdefault(label, ([], []))
        meta[label] = (r.dataset, setting)
        xs.append({"ref_gpu_hours": r.ref_gpu_hours, "flops": r.training_flops}.get(x, r.tokens))
        ys.append(float(r.evals[split]["normalised_ppl"]))
    points = {p: (np.asarray(xs, dtype=np.float64), np.asarray(ys)) for p, (xs, ys) in points.items()}
    return points, meta, x, note


def fit_scaling(points: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict[str, tuple] | None = None):
    """A power law per series with two or more compute levels, fitted to the best run at each level, and the
    crossing of every pair of laws on the same dataset that scored the same tokens (same max_tokens);
    settings that differ otherwise (a GPT's sliding window against an RNN's carried state) are named beside
    the crossing by the report."""
    meta = meta or {p: (None, None) for p in points}
    frontiers = {p: best_per_level(xs, ys) for p, (xs, ys) in points.items()}
    laws = {p: fit_power_law(*frontiers[p]) for p in points if len(frontiers[p][0]) >= 2}
    crossings = {}
    for p, q in itertools.combinations(sorted(laws), 2):
        (dp, sp), (dq, sq) = meta[p], meta[q]
        if dp != dq or (sp and sq and sp[3] != sq[3]):
            continue
        crossings[(p, q)] = crossing(laws[p], laws[q])
    return laws, crossings


def fit_warnings(points, laws) -> list[str]:
    """What a reader of the laws must know: a law through two compute levels is a line through two points,
    not a measured trend; runs left out because a better run shares their compute level."""
    warnings = []
    for p in laws:
        levels = compute_levels(points[p][0])
        if levels == 2:
            warnings.append(f"the {p} law is fitted through 2 compute levels only: it passes through both points "
                            "exactly and says nothing about the trend; add runs at more compute levels")
        left_out = len(points[p][0]) - levels
        if left_out:
            warnings.append(f"the {p} law is fitted to the best run at each of its {levels} compute levels; "
                            f"{left_out} other run(s) at those levels are plotted but not fitted")
    return warnings


def scaling_file(dataset: str | None, datasets: list) -> str:
    """scaling.png for a report of one dataset, scaling_<dataset>.png per dataset otherwise.

    The name comes from a run's (or a shared bundle's) config: one that is not a safe identifier becomes
    its letters, digits and `_` plus `-` and a hash of the whole name (no safe name holds a `-`), so it
    names a file in the report folder and no two datasets share one."""
    if len(datasets) <= 1:
        return SCALING
    if is_safe_name(dataset):
        return f"scaling_{dataset}.png"
    readable = re.sub(r"[^A-Za-z0-9_]+", "_", str(dataset)).strip("_")[:40]
    digest = hashlib.sha256(json.dumps(dataset).encode()).hexdigest()[:16]
    return f"scaling_{readable}-{digest}.png"


def compute_label(hours: float | None) -> str:
    """Reference-GPU hours, named after the compute class they match (within the rounding of steps)."""
    if hours is None:
        return "n/a"
    match = next((c for c in COMPUTE_CLASS_HOURS if abs(hours - c) <= 1e-3 * c), None)
    return f"{match} h class" if match else f"{hours:.4g} h"


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(rows: list[dict], splits: list[str]) -> str:
    headers = ["run", "model", "preset", "compute (ref-GPU h)", "training FLOPs", "steps", "tokens", "params"]
    headers += [f"norm. ppl {s}" for s in splits] + ["git"]
    lines = []
    for row in rows:
        steps = f"{row['steps']:,}"
        if row["planned_steps"] and row["steps"] < row["planned_steps"]:
            steps += f" of {row['planned_steps']:,}"
        cells = [
            row["run"],
            row["model"],
            row["preset"],
            compute_label(row["ref_gpu_hours"]),
            _fmt(row["training_flops"], ".3g"),
            steps,
            f"{row['tokens']:,}",
            _fmt(row["params"], ","),
        ]
        cells += [_fmt(row["normalised_ppl"].get(s), ".4f") for s in splits] + [row["git_revision"]]
        lines.append(cells)
    return _md_table(headers, lines)


def _in_range(cx: float, xs_a: np.ndarray, xs_b: np.ndarray) -> bool:
    """A crossing is measured only when it lies within the compute range of both laws' runs."""
    return max(xs_a.min(), xs_b.min()) <= cx <= min(xs_a.max(), xs_b.max())


def scaling_section(laws, crossings, points, meta, x: str, split: str, note: str, files: dict) -> list[str]:
    lines = [f"## Scaling: normalised perplexity on `{split}` against {X_LABELS[x]}", ""]
    if note:
        lines += [f"Note: {note}.", ""]
    for dataset, name in files.items():
        lines += [f"![scaling{f' on {dataset}' if dataset else ''}]({name})", ""]
    if not laws:
        return lines + [
            "No power law fitted: a series (project and optimiser, dataset, eval setting) needs evaluated runs at "
            "two or more compute levels.",
            "",
        ]
    rows = []
    for p, law in laws.items():
        n = compute_levels(points[p][0])
        dataset, setting = meta[p]
        kind = "2 points only: not a trend" if n == 2 else f"{n} compute levels"
        rows.append([p, str(dataset), setting_label(setting), str(len(points[p][0])), f"{law.a:.6g}", f"{law.b:.6g}",
                     kind])  # fmt: skip
    lines += [
        "Fitted y = a · x^b by least squares on log y against log x, per series (project and optimiser, "
        "dataset, eval setting), to the best run at each compute level (runs within 5% of one compute are one "
        "level; the others are plotted, not fitted). A law through two compute levels passes through both points "
        "exactly: it is a line, not a trend.",
        "",
        _md_table(["series", "dataset", "eval setting", "runs", "a", "b", "fit"], rows),
        "",
    ]
    for (p, q), where in crossings.items():
        if where is None:
            lines.append(f"- {p} and {q}: parallel laws, they never cross.")
            continue
        cx, cy = where
        inside = (
            "inside the measured range"
            if _in_range(cx, points[p][0], points[q][0])
            else "outside the measured range (extrapolated)"
        )
        differ = ""
        if meta[p][1] != meta[q][1]:
            differ = f" Eval settings differ ({setting_label(meta[p][1])} against {setting_label(meta[q][1])})."
        lines.append(f"- {p} and {q} cross at {cx:.4g} {X_LABELS[x]} (normalised ppl {cy:.4g}), {inside}.{differ}")
    return lines + [""]


def details_section(runs: list[Run]) -> list[str]:
    lines = ["## Runs", ""]
    for r in runs:
        c, env = r.config, r.env
        lines += [
            f"### {r.name}",
            "",
            f"- path: `{r.path}`",
            f"- dataset: {r.dataset} (vocab {r.vocab_size}), seq_len {c.get('seq_len')}, "
            f"batch {c.get('train_batch_size')}, tokens_per_second {r.tokens_per_second:g}, "
            f"FLOPs per token (fwd+bwd) {_fmt(r.flops_per_token, '.4g')}",
            f"- git revision: {r.git_revision}; torch {env.get('torch_version', '?')}; "
            f"device {env.get('device_name', '?')}; world size {env.get('world_size', '?')}",
        ]
        saved = [name for name in ("source.zip", "command.txt") if os.path.isfile(os.path.join(r.path, name))]
        lines.append(f"- saved with the run: {', '.join(saved) or 'no source.zip, no command.txt'}")
        command = env.get("command") or env.get("command_line") or env.get("argv")
        if command:
            lines.append(f"- command: `{' '.join(command) if isinstance(command, list) else command}`")
        for split, e in sorted(r.evals.items()):
            lines.append(
                f"- eval `{split}`: {setting_label(eval_setting(e))}, "
                f"checkpoint step {e.get('checkpoint_step')}, {e.get('n_tokens')} tokens, "
                f"bits/byte {_fmt(e.get('bits_per_byte'), '.4f')}"
            )
        lines.append("")
    return lines


def build_report(runs: list[Run], out_dir: str, split: str = "test", x: str = "auto") -> dict:
    """Write report.md, report.json and the plots into `out_dir`; return the report's data. A --split or
    --x the runs cannot serve is refused before anything is written."""
    missing_split = split_warnings(runs, split)
    scaling_axis(scored_runs(runs, split), x)
    os.makedirs(out_dir, exist_ok=True)
    splits = ordered_splits(runs)
    rows = [run_row(r, splits) for r in runs]  # counts parameters and FLOPs first: their warnings join the run's
    warnings = [w for r in runs for w in r.warnings + run_warnings(r)] + comparison_warnings(runs) + missing_split

    plot_learning_curves(runs, os.path.join(out_dir, CURVES_TOKENS), x="tokens", split=split)
    flops_note = plot_learning_curves(runs, os.path.join(out_dir, CURVES_FLOPS), x="flops", split=split)
    hours_note = plot_learning_curves(runs, os.path.join(out_dir, CURVES_HOURS), x="ref_gpu_hours", split=split)
    points, meta, x, note = scaling_points(runs, split, x)
    laws, crossings = fit_scaling(points, meta)
    warnings += fit_warnings(points, laws)
    datasets = sorted({d for d, _ in meta.values()}, key=str) or [None]
    files = {}
    for dataset in datasets:
        mine = {p: v for p, v in points.items() if meta[p][0] == dataset} if meta else {}
        marks, beyond = [], []
        for (p, q), c in crossings.items():
            if c is None or p not in mine:
                continue
            inside = _in_range(c[0], points[p][0], points[q][0])
            marks.append((c[0], c[1], inside))
            xs = np.concatenate([points[p][0], points[q][0]])
            if not xs.min() / 1.5 / EXTRAPOLATE_LIMIT <= c[0] <= xs.max() * 1.5 * EXTRAPOLATE_LIMIT:
                beyond.append(f"{p} and {q} cross at {c[0]:.3g} (extrapolated far beyond the plotted range)")
        files[dataset] = scaling_file(dataset, datasets)
        plot_scaling(
            mine, {p: law for p, law in laws.items() if p in mine}, marks,
            path_inside(out_dir, files[dataset], "scaling plot"),
            x_label=X_LABELS[x], y_label=f"normalised perplexity ({split})", note=note,
            title=f"normalised perplexity on '{split}'{f' of {dataset}' if dataset else ''} against compute",
            beyond=beyond,
        )  # fmt: skip

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Languini report ({len(runs)} run{'s' if len(runs) != 1 else ''}, {now})", ""]
    if warnings:
        md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    md += [
        "## Results",
        "",
        results_table(rows, splits),
        "",
        "Compute is the reference-GPU hours of the tokens seen (tokens / tokens_per_second / 3600); "
        "n/a when the run's config has no tokens_per_second. Training FLOPs are the counted forward and "
        "backward FLOPs per token of the run's config (`count_step_flops`) times the tokens seen.",
        "",
        "## Learning curves",
        "",
        "Lines: training loss. Hollow circles: in-training validation, the first `max_eval_steps` batches of "
        "`eval_batch_size` test streams from a zero state (a partial split: it tracks training). Stars: the "
        f"`eval.py` result on `{split}` (the number to report), at the checkpoint it scored.",
        "",
        f"![learning curves over tokens]({CURVES_TOKENS})",
        "",
        f"![learning curves over training FLOPs]({CURVES_FLOPS})",
        "",
        f"![learning curves over reference-GPU hours]({CURVES_HOURS})",
        "",
    ]
    for fallback in (flops_note, hours_note):
        if fallback:
            md += [f"Note: {fallback}.", ""]
    md += scaling_section(laws, crossings, points, meta, x, split, note, files) + details_section(runs)
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(md))

    data = {
        "runs": rows,
        "scaling": {
            "split": split,
            "x": x,
            "files": {str(d): f for d, f in files.items()},
            "laws": {
                p: {"a": law.a, "b": law.b, "dataset": meta[p][0], "eval_setting": setting_label(meta[p][1]),
                    "compute_levels": compute_levels(points[p][0])}
                for p, law in laws.items()
            },  # fmt: skip
            "crossings": [
                {"projects": [p, q], "x": c[0] if c else None, "y": c[1] if c else None,
                 "inside": bool(c and _in_range(c[0], points[p][0], points[q][0]))}
                for (p, q), c in crossings.items()
            ],  # fmt: skip
        },
        "warnings": warnings,
    }
    atomic_write_json(os.path.join(out_dir, "report.json"), data)
    return data


@exit_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(
        prog="languini report",
        description="Compare runs: a markdown table, learning curves, and normalised perplexity against "
        "compute with a power law fitted per series (project and optimiser, dataset, eval setting).",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders, or folders to search for runs (e.g. runs/)",
    )
    parser.add_argument("--out", default="reports", help="report folder (default: reports)")
    parser.add_argument("--split", default="test", help="split plotted against compute (default: test)")
    parser.add_argument(
        "--x", default="auto", choices=["auto", "ref_gpu_hours", "flops", "tokens"],
        help="compute axis of the scaling plot (default auto: reference-GPU hours when every run has a "
        "throughput, else training FLOPs, else tokens seen; another choice is refused when a run lacks what it needs)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    runs = load_runs(args.run_dirs)
    try:
        data = build_report(runs, args.out, args.split, args.x)
    except OSError as e:
        raise UserError(f"cannot write the report to {args.out}: {e.strerror or e}") from None
    for w in data["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(results_table(data["runs"], ordered_splits(runs)))
    print(f"\nreport written to {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
