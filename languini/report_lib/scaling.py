"""Power laws y = a * x**b, fitted by least squares in log space to the best run per compute level, and
where two of them cross.

The paper compares models by their scaling trend: normalised perplexity against reference-GPU hours on
log-log axes is close to a straight line, so a power law per model summarises it and two laws can be
extrapolated to the compute at which they would meet.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float

    def __call__(self, x):
        return self.a * np.power(np.asarray(x, dtype=np.float64), self.b)

    def __str__(self) -> str:
        return f"{self.a:.4g} * x^{self.b:.4g}"


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares fit of log y = log a + b log x. Needs two or more distinct positive x and positive y."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of the same length")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("a power law needs positive x and y")
    if len(np.unique(x)) < 2:
        raise ValueError("a power law needs at least two distinct x values")
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(a=float(np.exp(log_a)), b=float(b))


LEVEL_TOLERANCE = 0.05  # runs of one budget differ by the rounding of their step counts, well under 5%


def best_per_level(x, y, tolerance: float = LEVEL_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """The run with the lowest y at each compute level, in order of x: the frontier a scaling law describes.

    x values within `tolerance` (relative) of a level's smallest belong to that level. Several runs at one
    level (a sweep, an ablation) would otherwise pull the law towards their mean, and a weak run could move
    where two laws cross by orders of magnitude.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    best: list[int] = []
    anchor = None
    for i in np.argsort(x, kind="stable"):
        if anchor is not None and x[i] <= anchor * (1 + tolerance):
            if y[i] < y[best[-1]]:
                best[-1] = i
            continue
        anchor = x[i]
        best.append(i)
    return x[best], y[best]


def compute_levels(x) -> int:
    """How many compute levels (x values more than the tolerance apart) the points span."""
    return len(best_per_level(x, np.zeros(len(x)))[0])


def crossing(first: PowerLaw, second: PowerLaw) -> tuple[float, float] | None:
    """The (x, y) at which the two laws are equal, or None when they are parallel in log space."""
    if np.isclose(first.b, second.b, rtol=0.0, atol=1e-12):
        return None
    x = float(np.exp((np.log(second.a) - np.log(first.a)) / (first.b - second.b)))
    return x, float(first(x))
