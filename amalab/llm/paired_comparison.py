"""Paired differences between methods, with 95% intervals (docs/maths.md section 12).

Runs of two methods with the same seed index share the data, the held-out pairs and the policy's initial
adapter, so their difference removes what the seed alone does: d_s = m(A, s) - m(B, s) for a metric m, over
the seeds both have (a deterministic merge, which has one run, is paired with every seed of the other). The
interval is Student's t over the n differences: mean +- t_{0.975, n-1} sd / sqrt(n) (57), by
:func:`amalab.stats.paired_difference`.

Metrics: the worst-task excess (52), lower is better, and the worst generated task's generation success
(56), the lowest verifier success over the generated tasks, higher is better.
"""

from __future__ import annotations

import math

from amalab.stats import paired_difference
from amalab.training.merge import RANDOM_METHODS

#: metric name -> (what it is, True if higher is better)
METRICS = {"worst_excess": ("worst-task excess", False), "worst_success": ("worst generated task's success", True)}


def worst_success(record: dict) -> float | None:
    """The lowest generation success over the generated tasks of a run (56); None without one."""
    rates = [m["success"] for m in record.get("tasks", {}).values() if "success" in m]
    return min(rates) if rates else None


def _metric(record: dict, metric: str) -> float | None:
    value = worst_success(record) if metric == "worst_success" else record.get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def seed_paired_difference(runs_a: dict[int, dict], runs_b: dict[int, dict], metric: str,
                           broadcast: bool = False) -> dict | None:
    """Mean of d_s = m(A, s) - m(B, s) over the seeds both have, and its 95% t-interval (57); with
    ``broadcast`` (B is deterministic: one run), B's run is paired with every seed of A. None if unpaired;
    the interval's ends are None with a single difference."""
    if broadcast:
        (only,) = runs_b.values()
        pairs = [(_metric(runs_a[s], metric), _metric(only, metric)) for s in sorted(runs_a)]
    else:
        pairs = [(_metric(runs_a[s], metric), _metric(runs_b[s], metric)) for s in sorted(set(runs_a) & set(runs_b))]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    result = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    return {key: result[key] for key in ("n", "mean", "low", "high", "differences")}


def best_merge(summary_methods: dict) -> str | None:
    """The merge with the lowest mean worst-task excess (the strongest merge, chosen after the fact)."""
    merges = [m for m in summary_methods if m.startswith("merge-")]
    return min(merges, key=lambda m: summary_methods[m]["worst_excess"]["mean"]) if merges else None


def _deterministic(method: str) -> bool:
    return method.startswith("merge-") and method.removeprefix("merge-") not in RANDOM_METHODS


def comparisons(records: list[dict], summary_methods: dict) -> list[dict]:
    """Every AMA method against standard and against the best merge, and against its own in-sample
    variant (the same method, the same seeds, only s(z) differs), per metric."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[int(r["seed"])] = r
    rows = []
    for method in (m for m in by_method if m.startswith("ama-") and not m.endswith("-in-sample")):
        controls = ["standard", best_merge(summary_methods), f"{method}-in-sample"]
        for against in (c for c in controls if c in by_method):
            for metric in METRICS:
                result = seed_paired_difference(by_method[method], by_method[against], metric,
                                                _deterministic(against))
                if result is not None:
                    rows.append({"method": method, "against": against, "metric": metric, **result})
    return rows
