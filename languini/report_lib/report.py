"""`languini report RUN_DIR... [--out DIR]`: compare runs in a markdown table with plots.

Writes DIR/report.md (one row per run: project, preset, compute, steps, tokens, parameters, normalised
perplexity of every evaluated split, git revision), DIR/report.json (the same numbers, unrounded), learning
curves over tokens and over reference-GPU hours, and normalised perplexity against compute on log-log axes
with a power law fitted per project and the points where two projects' laws cross (the paper's way of
comparing scaling trends). Warns when the runs compared differ in dataset, vocabulary or eval protocol.
"""

import argparse
import datetime
import itertools
import os
import sys

import numpy as np

from languini.common_lib.atomic_io import atomic_write_json, atomic_write_text
from languini.common_lib.errors import UserError, exit_on_user_error
from languini.report_lib.plots import X_LABELS, plot_learning_curves, plot_scaling
from languini.report_lib.runs import Run, load_runs
from languini.report_lib.scaling import crossing, fit_power_law
from languini.tools.compute_classes import COMPUTE_CLASS_HOURS

CURVES_TOKENS = "curves_tokens.png"
CURVES_HOURS = "curves_ref_gpu_hours.png"
SCALING = "scaling.png"


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
    """Why the runs' numbers may not be comparable: dataset, vocabulary or eval protocol differ."""
    warnings = _differs("datasets", {r.name: r.dataset for r in runs if r.dataset is not None})
    warnings += _differs("vocabularies", {r.name: r.vocab_size for r in runs if r.vocab_size is not None})
    for split in ordered_splits(runs):
        evals = {r.name: r.evals[split] for r in runs if split in r.evals}
        protocols = {name: e.get("protocol") for name, e in evals.items()}
        warnings += _differs(f"eval protocols on split '{split}'", protocols)
        for protocol in set(protocols.values()):
            same = {name: e.get("last_n") for name, e in evals.items() if protocols[name] == protocol}
            warnings += _differs(f"last_n on split '{split}' (protocol {protocol})", same)
    return warnings


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
        "preset": run.preset,
        "ref_gpu_hours": run.ref_gpu_hours,
        "tokens_per_second": run.tokens_per_second,
        "steps": run.steps,
        "planned_steps": run.planned_steps,
        "tokens": run.tokens,
        "params": run.n_params,
        "dataset": run.dataset,
        "vocab_size": run.vocab_size,
        "normalised_ppl": {s: run.evals[s].get("normalised_ppl") for s in splits if s in run.evals},
        "git_revision": run.git_revision,
    }


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))


def scaling_points(runs: list[Run], split: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, str]:
    """Per project, (compute, normalised ppl on `split`) of each evaluated run. Compute is reference-GPU
    hours when every such run has a throughput, else tokens seen. Returns (points, x key, note)."""
    scored = [r for r in runs if r.tokens > 0 and _is_finite(r.evals.get(split, {}).get("normalised_ppl"))]
    x, note = "ref_gpu_hours", ""
    if any(r.tokens_per_second <= 0 for r in scored):
        x = "tokens"
        note = "tokens_per_second is 0 for some runs: compute is tokens seen, not reference-GPU hours"
    points: dict[str, tuple[list, list]] = {}
    for r in scored:
        xs, ys = points.setdefault(r.project, ([], []))
        xs.append(r.ref_gpu_hours if x == "ref_gpu_hours" else r.tokens)
        ys.append(float(r.evals[split]["normalised_ppl"]))
    return {p: (np.asarray(xs), np.asarray(ys)) for p, (xs, ys) in points.items()}, x, note


def fit_scaling(points: dict[str, tuple[np.ndarray, np.ndarray]]):
    """A power law per project with two or more compute levels, and the crossing of every pair of laws."""
    laws = {p: fit_power_law(xs, ys) for p, (xs, ys) in points.items() if len(np.unique(xs)) >= 2}
    crossings = {}
    for p, q in itertools.combinations(sorted(laws), 2):
        crossings[(p, q)] = crossing(laws[p], laws[q])
    return laws, crossings


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
    headers = ["run", "project", "preset", "compute (ref-GPU h)", "steps", "tokens", "params"]
    headers += [f"norm. ppl {s}" for s in splits] + ["git"]
    lines = []
    for row in rows:
        steps = f"{row['steps']:,}"
        if row["planned_steps"] and row["steps"] < row["planned_steps"]:
            steps += f" of {row['planned_steps']:,}"
        cells = [
            row["run"],
            row["project"],
            row["preset"],
            compute_label(row["ref_gpu_hours"]),
            steps,
            f"{row['tokens']:,}",
            _fmt(row["params"], ","),
        ]
        cells += [_fmt(row["normalised_ppl"].get(s), ".4f") for s in splits] + [row["git_revision"]]
        lines.append(cells)
    return _md_table(headers, lines)


def scaling_section(laws, crossings, points, x: str, split: str, note: str) -> list[str]:
    lines = [f"## Scaling: normalised perplexity on `{split}` against {X_LABELS[x]}", ""]
    if note:
        lines += [f"Note: {note}.", ""]
    lines += [f"![scaling]({SCALING})", ""]
    if not laws:
        return lines + [
            "No power law fitted: a project needs evaluated runs at two or more compute levels.",
            "",
        ]
    xs_all = np.concatenate([p[0] for p in points.values()])
    rows = [[p, str(len(points[p][0])), f"{law.a:.6g}", f"{law.b:.6g}"] for p, law in laws.items()]
    lines += [
        "Fitted y = a · x^b by least squares on log y against log x.",
        "",
        _md_table(["project", "runs", "a", "b"], rows),
        "",
    ]
    for (p, q), where in crossings.items():
        if where is None:
            lines.append(f"- {p} and {q}: parallel laws, they never cross.")
            continue
        cx, cy = where
        inside = "inside" if xs_all.min() <= cx <= xs_all.max() else "outside (extrapolated)"
        lines.append(
            f"- {p} and {q} cross at {cx:.4g} {X_LABELS[x]} (normalised ppl {cy:.4g}), "
            f"{inside} the measured range."
        )
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
            f"batch {c.get('train_batch_size')}, tokens_per_second {r.tokens_per_second:g}",
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
                f"- eval `{split}`: protocol {e.get('protocol')}, last_n {e.get('last_n')}, "
                f"checkpoint step {e.get('checkpoint_step')}, {e.get('n_tokens')} tokens, "
                f"bits/byte {_fmt(e.get('bits_per_byte'), '.4f')}"
            )
        lines.append("")
    return lines


def build_report(runs: list[Run], out_dir: str, split: str = "test") -> dict:
    """Write report.md, report.json and the plots into `out_dir`; return the report's data."""
    os.makedirs(out_dir, exist_ok=True)
    splits = ordered_splits(runs)
    rows = [run_row(r, splits) for r in runs]  # counts parameters first: its warnings join the run's
    warnings = [w for r in runs for w in r.warnings + run_warnings(r)] + comparison_warnings(runs)

    plot_learning_curves(runs, os.path.join(out_dir, CURVES_TOKENS), x="tokens")
    hours_note = plot_learning_curves(runs, os.path.join(out_dir, CURVES_HOURS), x="ref_gpu_hours")
    points, x, note = scaling_points(runs, split)
    laws, crossings = fit_scaling(points)
    plot_scaling(
        points,
        laws,
        [c for c in crossings.values() if c],
        os.path.join(out_dir, SCALING),
        x_label=X_LABELS[x],
        y_label=f"normalised perplexity ({split})",
        note=note,
    )

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
        "n/a when the run's config has no tokens_per_second.",
        "",
        "## Learning curves",
        "",
        f"![learning curves over tokens]({CURVES_TOKENS})",
        "",
        f"![learning curves over reference-GPU hours]({CURVES_HOURS})",
        "",
    ]
    if hours_note:
        md += [f"Note: {hours_note}.", ""]
    md += scaling_section(laws, crossings, points, x, split, note) + details_section(runs)
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(md))

    data = {
        "runs": rows,
        "scaling": {
            "split": split,
            "x": x,
            "laws": {p: {"a": law.a, "b": law.b} for p, law in laws.items()},
            "crossings": [
                {"projects": [p, q], "x": c[0] if c else None, "y": c[1] if c else None}
                for (p, q), c in crossings.items()
            ],
        },
        "warnings": warnings,
    }
    atomic_write_json(os.path.join(out_dir, "report.json"), data)
    return data


def _usage_error(message: str):
    """argparse's mistakes as one `error: ...` line (exit code 2), like every other languini command."""
    raise UserError(f"{message} (see languini report --help)")


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="languini report",
        description="Compare runs: a markdown table, learning curves, and normalised perplexity against "
        "compute with a power law fitted per project.",
        allow_abbrev=False,
    )
    parser.error = _usage_error
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders, or folders to search for runs (e.g. runs/)",
    )
    parser.add_argument("--out", default="reports", help="report folder (default: reports)")
    parser.add_argument("--split", default="test", help="split plotted against compute (default: test)")
    args = parser.parse_args(argv)

    runs = load_runs(args.run_dirs)
    data = build_report(runs, args.out, args.split)
    for w in data["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(results_table(data["runs"], ordered_splits(runs)))
    print(f"\nreport written to {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
