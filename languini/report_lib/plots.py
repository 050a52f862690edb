"""PNG plots of runs: learning curves and the normalised-perplexity scaling plot with power-law fits.

Figures are drawn with matplotlib's Agg canvas directly (no GUI backend, no global pyplot state) and
written atomically, so plotting works on headless servers and never leaves a half-written PNG.
"""

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from languini.common_lib.atomic_io import atomic_write_bytes
from languini.report_lib.runs import Run
from languini.report_lib.scaling import PowerLaw

X_LABELS = {"step": "optimiser steps", "tokens": "tokens seen", "ref_gpu_hours": "reference-GPU hours"}
EXTRAPOLATE_LIMIT = 1e4  # draw a crossing of two fits only up to this factor beyond the measured compute


def _new_figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: str):
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _label_log_axis(axis, low: float, high: float):
    """Plain-number tick labels (0.02, 5) on a log axis: at 1, 2 and 5 times a power of ten, or at every
    tick when the axis spans less than a decade, so that short ranges still get labels."""
    digits = set(range(1, 10)) if high < 10 * low else {1, 2, 5}

    def label(value: float, _) -> str:
        if value <= 0:
            return ""
        leading = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if leading in digits else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def curve_axis(runs: list[Run], x: str) -> tuple[str, str]:
    """The x-axis a curve plot can use and a note when it had to fall back: reference-GPU hours need
    every run's `tokens_per_second`; without it the plot uses tokens seen instead."""
    if x != "ref_gpu_hours":
        return x, ""
    missing = [r.name for r in runs if r.tokens_per_second <= 0]
    if not missing:
        return x, ""
    return "tokens", f"tokens_per_second is 0 for {', '.join(missing)}: x-axis falls back to tokens seen"


def plot_learning_curves(
    runs: list[Run], path: str, x: str = "tokens", metric: str = "train/loss", eval_metric: str = "eval/loss"
) -> str:
    """Training curve of each run (line) with its validation points (markers) over `x`.

    Returns the fallback note of `curve_axis` ('' when the requested axis was used)."""
    x, note = curve_axis(runs, x)
    title = f"{metric} (lines) and {eval_metric} (dots) over {X_LABELS[x]}"
    fig, ax = _new_figure(title + (f"\n{note}" if note else ""))
    for run in runs:
        xs, ys = run.series(metric, x)
        (line,) = ax.plot(xs, ys, linewidth=1.2, label=f"{run.name} ({run.project} {run.preset})")
        ex, ey = run.series(eval_metric, x)
        if len(ex):
            ax.plot(ex, ey, "o", markersize=4, color=line.get_color())
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("loss (nats per token)")
    if runs:
        ax.legend(fontsize=8)
    _save(fig, path)
    return note


def _fit_range(points: dict[str, tuple[np.ndarray, np.ndarray]], crossings: list[tuple[float, float]]):
    xs = np.concatenate([p[0] for p in points.values()])
    lo, hi = float(xs.min()) / 1.5, float(xs.max()) * 1.5
    for cx, _ in crossings:
        if lo / EXTRAPOLATE_LIMIT <= cx <= hi * EXTRAPOLATE_LIMIT:
            lo, hi = min(lo, cx / 1.5), max(hi, cx * 1.5)
    return lo, hi


def plot_scaling(
    points: dict[str, tuple[np.ndarray, np.ndarray]],
    laws: dict[str, PowerLaw],
    crossings: list[tuple[float, float]],
    path: str,
    x_label: str,
    y_label: str = "normalised perplexity",
    note: str = "",
):
    """Log-log scatter of `points` (project -> (x, y)) with each project's fitted law as a dashed line
    (extended to any crossing within EXTRAPOLATE_LIMIT of the data) and the crossings marked."""
    title = f"{y_label} against compute" + (f"\n{note}" if note else "")
    fig, ax = _new_figure(title)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if points:
        lo, hi = _fit_range(points, crossings)
        grid = np.geomspace(lo, hi, 200)
        for project, (xs, ys) in points.items():
            (dots,) = ax.plot(xs, ys, "o", label=project)
            if project in laws:
                law = laws[project]
                ax.plot(grid, law(grid), "--", color=dots.get_color(), label=f"{project} fit: {law}")
        for cx, cy in crossings:
            if lo <= cx <= hi:
                ax.plot([cx], [cy], "kx", markersize=9)
                ax.annotate(
                    f"cross at {cx:.3g}", (cx, cy), textcoords="offset points", xytext=(6, 6), fontsize=8
                )
        ax.legend(fontsize=8)
    _label_log_axis(ax.xaxis, *ax.get_xlim())
    _label_log_axis(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    _save(fig, path)
