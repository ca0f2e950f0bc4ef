"""The run's numbers: per point and method, normalized per-task returns, the worst task's, and held-out
excess losses, each with a 95% interval over seeds (:func:`amalab.stats.t_interval`; a single seed's
interval is its value).

The main comparison is normalized by its own reference and specialists. A sweep point is normalized on the
main comparison's scale (0: the main reference's return, 1: the main specialists'), so that the sweep
plots every dataset on one scale; a noisy or poor dataset's own specialists can be barely better than its
reference, and dividing by that difference would blow the values up. Each point's own reference and
specialist returns are in the summary too."""

from __future__ import annotations

import numpy as np

from amalab.control.evaluation import normalized_returns
from amalab.markdown import markdown_table
from amalab.stats import t_interval


def _interval(values) -> dict:
    """The mean over seeds and its 95% t-interval; one seed's interval is its value (half-width 0)."""
    interval = t_interval(values)
    if interval["low"] is None:
        return {**interval, "low": interval["mean"], "high": interval["mean"]}
    return interval


def _by_method(records: list[dict], kinds: tuple[str, ...]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["kind"] in kinds:
            grouped.setdefault(r["method"], []).append(r)
    return grouped


def summarize_point(records: list[dict], task_names: list[str], scale: dict | None = None) -> dict:
    """One point's summary (module docstring). Excess: held-out loss minus the same seed's specialist's.

    ``scale``: the summary whose reference and specialist returns normalize this point (None: its own).
    """
    k = len(task_names)
    reference = np.array(next(r for r in records if r["kind"] == "reference")["returns"])
    specialists = _by_method(records, ("specialist",))
    own = [[r["returns"][i] for r in specialists[f"specialist-{name}"]] for i, name in enumerate(task_names)]
    own_loss = np.array([[r["held_out_loss"][i] for r in specialists[f"specialist-{name}"]]
                         for i, name in enumerate(task_names)]).T  # (seeds, k)
    specialist_returns = np.array([np.mean(v) for v in own])
    zero, one = (reference, specialist_returns) if scale is None else \
        (np.array(scale["reference_returns"]), np.array(scale["specialist_returns"]))
    methods = {}
    for name, rows in _by_method(records, ("method", "merge", "specialist")).items():
        returns = np.array([r["returns"] for r in rows])
        normalized = normalized_returns(returns, zero, one)
        excess = np.array([r["held_out_loss"] for r in rows]) - own_loss[[r["seed"] for r in rows]]
        methods[name] = {"kind": rows[0]["kind"], "seeds": len(rows),
                         "returns": returns.mean(0).tolist(),
                         "normalized": [_interval(normalized[:, i]) for i in range(k)],
                         "worst": _interval(normalized.min(axis=1)),
                         "excess": [_interval(excess[:, i]) for i in range(k)],
                         "worst_excess": _interval(excess.max(axis=1))}
    return {"reference_returns": reference.tolist(), "specialist_returns": specialist_returns.tolist(),
            "counts": records[0]["counts"], "methods": methods}


def _cell(interval: dict) -> str:
    return f"{interval['mean']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def main_table(summary: dict, task_names: list[str]) -> str:
    """Markdown: one row per method of the main point, generalists and merges first."""
    point = summary["main"]
    head = ["method", "seeds", "worst task (normalized)", *[f"{t} (normalized)" for t in task_names],
            "worst held-out excess"]
    rows = sorted(point["methods"].items(), key=lambda item: (item[1]["kind"] == "specialist", item[0]))
    body = [[name, str(m["seeds"]), _cell(m["worst"]), *map(_cell, m["normalized"]), _cell(m["worst_excess"])]
            for name, m in rows]
    returns = ", ".join(f"{t} {r:.1f}" for t, r in zip(task_names, point["reference_returns"]))
    best = ", ".join(f"{t} {r:.1f}" for t, r in zip(task_names, point["specialist_returns"]))
    return (markdown_table(head, body, rule="---")
            + f"\n\nReturns: reference {returns}; specialists (mean over seeds) {best}.\n")


def sweep_table(summary: dict, points: list) -> str:
    """Markdown: the worst task's normalized return at each sweep value, one row per (knob, loss, method)."""
    head = ["knob", "loss", "method", "value", "seeds", "worst task (normalized on the main scale)",
            "worst held-out excess"]
    body = [[point.sweep, point.loss.loss_type, name, f"{point.value:g}", str(m["seeds"]), _cell(m["worst"]),
             _cell(m["worst_excess"])]
            for point in points if point.sweep is not None
            for name, m in summary[point.name]["methods"].items() if m["kind"] != "specialist"]
    return markdown_table(head, body, rule="---") + "\n"


def tables(summary: dict, points: list, task_names: list[str]) -> str:
    """table.md: the main comparison's table, then, with sweep points, the sweeps' table."""
    text = "## Main comparison\n\n" + main_table(summary, task_names)
    if len(points) > 1:
        text += "\n## Sweeps: the worst task\n\n" + sweep_table(summary, points)
    return text
