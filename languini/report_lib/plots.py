"""PNG plots of runs: learning curves and the normalised-perplexity scaling plot with power-law fits.

Figures are drawn with matplotlib's Agg canvas directly (no GUI backend, no global pyplot state) and
written atomically, so plotting works on headless servers and never leaves a half-written PNG.
"""

import io
import math
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

from languini.common_lib.atomic_io import atomic_write_bytes
from languini.report_lib.runs import Run
from languini.report_lib.scaling import PowerLaw, compute_levels

X_LABELS = {
    "step": "optimiser steps",
    "tokens": "tokens seen",
    "flops": "training FLOPs (counted fwd+bwd FLOPs per token x tokens)",
    "ref_gpu_hours": "reference-GPU hours",
}
EXTRAPOLATE_LIMIT = 1e4  # draw a crossing of two fits only up to this factor beyond the measured compute
TITLE_WIDTH = 90  # characters per title line


def _new_figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(8.5, 5.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lines = [w for part in title.split("\n") for w in textwrap.wrap(part, TITLE_WIDTH) or [""]]
    ax.set_title("\n".join(lines), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: str):
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def tick_label(value: float) -> str:
    """A short tick label with up to two significant digits: 0.02, 5, 300, 2e4, 1.5e12, 1e15."""
    if value <= 0:
        return ""
    if 1e-3 <= value < 1e4:
        return f"{value:.2g}" if value < 10 else f"{value:.0f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def log_tick_subs(low: float, high: float) -> tuple[tuple[float, ...], int]:
    """Which multiples of each power of ten get a labelled tick, and every how many decades: few enough
    that the labels never overlap (at most about eight)."""
    decades = math.log10(high / low) if high > low > 0 else 1.0
    if decades < 0.7:
        return (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9), 1
    if decades < 1.5:
        return (1, 2, 3, 5), 1
    if decades < 3:
        return (1, 2, 5), 1
    return (1,), max(1, math.ceil(decades / 8))


def _label_log_axis(axis, low: float, high: float):
    """Readable labels on a log axis: a few ticks (see log_tick_subs) labelled with tick_label, unlabelled
    minor ticks."""
    subs, every = log_tick_subs(low, high)
    if every > 1:
        lo_exp, hi_exp = math.floor(math.log10(low)), math.ceil(math.log10(high))
        axis.set_major_locator(FixedLocator([10.0**e for e in range(lo_exp, hi_exp + 1) if e % every == 0]))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=50))
    axis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    axis.set_minor_locator(LogLocator(base=10, subs="auto", numticks=50))
    axis.set_minor_formatter(NullFormatter())


def curve_axis(runs: list[Run], x: str) -> tuple[str, str]:
    """The x-axis a curve plot can use and a note when it had to fall back: reference-GPU hours need
    every run's `tokens_per_second`, FLOPs a countable model; without them the plot uses tokens seen."""
    if x == "ref_gpu_hours":
        missing = [r.name for r in runs if r.tokens_per_second <= 0]
        what = "tokens_per_second is 0"
    elif x == "flops":
        missing = [r.name for r in runs if r.flops_per_token is None]
        what = "FLOPs could not be counted"
    else:
        return x, ""
    if not missing:
        return x, ""
    return "tokens", f"{what} for {', '.join(missing)}: x-axis falls back to tokens seen"


def validation_label(runs: list[Run]) -> str:
    """What the in-training validation dots are: the first max_eval_steps batches of the test streams."""
    steps = {r.config.get("max_eval_steps") for r in runs}
    batch = {r.config.get("eval_batch_size") for r in runs}
    n = f"{steps.pop()}" if len(steps) == 1 and None not in steps else "max_eval_steps"
    b = f"{batch.pop()}" if len(batch) == 1 and None not in batch else "eval_batch_size"
    if n == "-1":
        return f"in-training validation: the whole test split as {b} streams, from zero state"
    return f"in-training validation: first {n} batches of {b} test streams, from zero state"


def _eval_point(run: Run, x: str, split: str) -> tuple[float, float] | None:
    """(x, loss) of the run's eval.py result on `split`, at the step of the checkpoint it scored."""
    result = run.evals.get(split, {})
    if result.get("loss") is None:
        return None
    step = result.get("checkpoint_step")
    records = [r for r in run.metrics if r.get("step") == step] if step is not None else []
    record = records[-1] if records else (run.metrics[-1] if run.metrics else None)
    xv = None if record is None else run._x_of(record, x)
    return None if xv is None else (xv, float(result["loss"]))


def plot_learning_curves(
    runs: list[Run], path: str, x: str = "tokens", metric: str = "train/loss", eval_metric: str = "eval/loss",
    split: str = "test",
) -> str:
    """Training curve of each run (line), its in-training validation (hollow circles) and its eval.py
    result on `split` (a star at the scored checkpoint) over `x`.

    Returns the fallback note of `curve_axis` ('' when the requested axis was used)."""
    x, note = curve_axis(runs, x)
    title = f"{metric} (lines), in-training validation (hollow circles) and eval.py on '{split}' (stars) over {X_LABELS[x]}"
    fig, ax = _new_figure(title + (f"\n{note}" if note else ""))
    shown_validation = shown_eval = False
    for run in runs:
        xs, ys = run.series(metric, x)
        (line,) = ax.plot(xs, ys, linewidth=1.2, label=f"{run.name} ({run.model} {run.preset})")
        ex, ey = run.series(eval_metric, x)
        if len(ex):
            ax.plot(ex, ey, "o", markersize=5, markerfacecolor="none", color=line.get_color())
            shown_validation = True
        point = _eval_point(run, x, split)
        if point:
            ax.plot([point[0]], [point[1]], "*", markersize=12, color=line.get_color(), markeredgecolor="black")
            shown_eval = True
    # the two kinds of marker get one grey legend entry each, after the runs' colours
    if shown_validation:
        ax.plot([], [], "o", markersize=5, markerfacecolor="none", color="grey", label=validation_label(runs))
    if shown_eval:
        ax.plot([], [], "*", markersize=12, color="grey", markeredgecolor="black",
                label=f"eval.py on '{split}' (whole split, or its --max_tokens cap)")  # fmt: skip
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("loss (nats per token)")
    if runs:
        ax.legend(fontsize=7)
    _save(fig, path)
    return note


def scaling_x_range(points: dict[str, tuple[np.ndarray, np.ndarray]], crossings: list[tuple[float, float, bool]]):
    """The x range of the scaling plot, (low, high, crossings drawn): the measured compute widened by 1.5x
    each side (so runs at one budget sit in half a decade of axis instead of filling it with their rounding
    differences), and widened further to show each crossing within EXTRAPOLATE_LIMIT of the data."""
    xs_all = np.concatenate([p[0] for p in points.values()])
    lo, hi = float(xs_all.min()) / 1.5, float(xs_all.max()) * 1.5
    drawn = [c for c in crossings if lo / EXTRAPOLATE_LIMIT <= c[0] <= hi * EXTRAPOLATE_LIMIT]
    for cx, _, _ in drawn:
        lo, hi = min(lo, cx / 1.5), max(hi, cx * 1.5)
    return lo, hi, drawn


def plot_scaling(
    points: dict[str, tuple[np.ndarray, np.ndarray]],
    laws: dict[str, PowerLaw],
    crossings: list[tuple[float, float, bool]],
    path: str,
    x_label: str,
    y_label: str = "normalised perplexity",
    note: str = "",
    title: str = "",
    beyond: list[str] = (),
):
    """Log-log scatter of `points` (series -> (x, y)) with each series' fitted law: solid over its measured
    range, dotted where extrapolated. A law through two points only is drawn dotted and labelled so.
    `crossings` are (x, y, inside the measured range); one outside is marked as extrapolated, and one
    beyond EXTRAPOLATE_LIMIT of the data is named in a corner (`beyond`) instead of drawn. Returns the
    legend's labels."""
    title = (title or f"{y_label} against compute") + (f"\n{note}" if note else "")
    fig, ax = _new_figure(title)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if points:
        lo, hi, drawn = scaling_x_range(points, crossings)
        ax.set_xlim(lo, hi)
        for series, (xs, ys) in points.items():
            (dots,) = ax.plot(xs, ys, "o", label=series)
            if series not in laws:
                continue
            law, n = laws[series], compute_levels(xs)
            inside = np.geomspace(xs.min(), xs.max(), 50)
            style = ":" if n < 3 else "-"
            what = f"{series} fit: {law}" + (" (2 levels only: a line, not a trend)" if n < 3 else f" ({n} levels)")
            ax.plot(inside, law(inside), style, color=dots.get_color(), linewidth=1.2, label=what)
            for a, b in ((lo, xs.min()), (xs.max(), hi)):
                if b > a:
                    grid = np.geomspace(a, b, 50)
                    ax.plot(grid, law(grid), ":", color=dots.get_color(), linewidth=0.9, alpha=0.7)
        for cx, cy, measured in drawn:
            if measured:
                ax.plot([cx], [cy], "kx", markersize=9)
                text = f"cross at {tick_label(cx)} (measured range)"
            else:
                ax.plot([cx], [cy], "o", markersize=9, markerfacecolor="none", markeredgecolor="red")
                text = f"extrapolated crossing at {tick_label(cx)}"
            ax.annotate(text, (cx, cy), textcoords="offset points", xytext=(6, 6), fontsize=8)
        if any(series in laws for series in points):  # every drawn law runs on, dotted, past its points
            ax.plot([], [], ":", color="gray", label="dotted: extrapolated beyond the measured range")
        ax.legend(fontsize=7)
        for i, text in enumerate(beyond):
            ax.text(0.01, 0.02 + 0.05 * i, text, transform=ax.transAxes, fontsize=7, color="red")
    _label_log_axis(ax.xaxis, *ax.get_xlim())
    _label_log_axis(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    _save(fig, path)
    return ax.get_legend_handles_labels()[1]
