"""Numbers over seeds, for every report (the LLM experiment's, the MuJoCo suite's): the spread of a metric,
the 95% Student-t interval of its mean, and the paired difference of two methods seed by seed.

The interval over n values is mean +- t_{0.975, n-1} s / sqrt(n), s the sample standard deviation
(docs/maths.md section 12, (57)); with one value there is no s to estimate and no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count of ``values``."""
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(len(arr))}


def t_interval(values: Sequence[float]) -> dict:
    """The mean of ``values`` and its 95% Student-t interval: {"mean", "low", "high", "n"}; ``low`` and
    ``high`` are None for a single value."""
    arr = np.asarray(values, dtype=float)
    n, mean = len(arr), float(arr.mean())
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.975, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """d_s = a_s - b_s for the pairs (a_s, b_s) (same seed), its mean and 95% t-interval
    (:func:`t_interval`) and the differences themselves."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_difference: expected two equally long, non-empty sequences, got lengths "
                         f"{len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    return {**t_interval(differences), "differences": differences}
