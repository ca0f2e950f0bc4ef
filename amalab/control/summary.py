"""The run's numbers: per point and method, normalized per-task returns, the worst task's, and held-out
excess losses, each with a 95% interval over seeds (:func:`amalab.stats.t_interval`; a single seed's
interval is its value).

A task is normalized only if its specialists beat the reference: the interval over seeds of the
specialist's gain over the reference lies above a floor, ``min_gain`` times the reference's |return|
(docs/maths.md (62a); 0 with ``min_gain = 0``). A task without that scale has no
normalized score, and the worst task is taken over the tasks that have one (63).

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


def seed_interval(values) -> dict:
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


def task_scales(records: list[dict], task_names: list[str], min_gain: float = 0.0) -> dict:
    """The point's scale (docs/maths.md (61)-(62a)): the reference's returns on each seed's evaluation episodes
    and their mean, the specialists' mean returns on their own tasks, each specialist's gain over the
    reference on the same episodes (an interval over seeds) and whether its interval lies above
    ``min_gain`` x |the reference's mean return| (``scaled``; the floor of each task in ``gain_floor``)."""
    reference = np.array([r["returns"] for r in _by_method(records, ("reference",))["reference"]])  # (seeds, k)
    specialists = _by_method(records, ("specialist",))
    own = np.array([[r["returns"][i] for r in specialists[f"specialist-{name}"]]
                    for i, name in enumerate(task_names)]).T  # (seeds, k), seed s on row s
    gain = [seed_interval(own[:, i] - reference[:, i]) for i in range(len(task_names))]
    floor = (min_gain * np.abs(reference.mean(0))).tolist()
    return {"reference_returns": reference.mean(0).tolist(), "reference_by_seed": reference.tolist(),
            "specialist_returns": own.mean(0).tolist(), "specialist_gain": gain, "gain_floor": floor,
            "scaled": [g["low"] > f for g, f in zip(gain, floor)]}


def unscaled_lines(scale: dict, task_names: list[str]) -> list[str]:
    """One line per task without a scale, naming its reference's and specialists' returns."""
    return [f"task {name}: its specialists ({scale['specialist_returns'][i]:.1f}, gain "
            f"{interval_cell(scale['specialist_gain'][i])} over seeds) do not beat the reference ({scale['reference_returns'][i]:.1f})"
            f"{_floor_words(scale, i)}: no normalized score; "
            f"the worst task is taken over {', '.join(n for n, ok in zip(task_names, scale['scaled']) if ok) or 'none'}"
            for i, name in enumerate(task_names) if not scale["scaled"][i]]


def _floor_words(scale: dict, i: int) -> str:
    floor = scale["gain_floor"][i]
    return f" by more than {floor:.2f}" if floor > 0 else ""


def summarize_point(records: list[dict], task_names: list[str], scale: dict | None = None,
                    min_gain: float = 0.0) -> dict:
    """One point's summary (module docstring). Excess: held-out loss minus the same seed's specialist's.

    ``scale``: the :func:`task_scales` that normalize this point (None: its own, with the gain floor
    ``min_gain``); a method's return on seed s is measured from the scale's reference on seed s's episodes,
    in units of the specialists' mean gain.
    """
    k, own = len(task_names), task_scales(records, task_names, min_gain)
    scale = own if scale is None else scale
    scaled = [i for i in range(k) if scale["scaled"][i]]
    specialists = _by_method(records, ("specialist",))
    own_loss = np.array([[r["held_out_loss"][i] for r in specialists[f"specialist-{name}"]]
                         for i, name in enumerate(task_names)]).T  # (seeds, k)
    zero = np.array(scale["reference_by_seed"])
    gain = np.array(scale["specialist_returns"]) - np.array(scale["reference_returns"])
    methods, worst_by_seed = {}, {}
    for name, rows in _by_method(records, ("method", "merge", "specialist")).items():
        seeds = [r["seed"] for r in rows]
        returns = np.array([r["returns"] for r in rows])
        normalized = normalized_returns(returns, zero[seeds], gain)
        excess = np.array([r["held_out_loss"] for r in rows]) - own_loss[seeds]
        if scaled:
            worst_by_seed[name] = dict(zip(seeds, normalized[:, scaled].min(axis=1)))
        methods[name] = {"kind": rows[0]["kind"], "seeds": len(rows),
                         "returns": returns.mean(0).tolist(),
                         "normalized": [seed_interval(normalized[:, i]) if i in scaled else None for i in range(k)],
                         "worst": seed_interval(list(worst_by_seed[name].values())) if scaled else None,
                         "worst_by_seed": [float(v) for v in worst_by_seed[name].values()] if scaled else None,
                         "excess": [seed_interval(excess[:, i]) for i in range(k)],
                         "worst_excess": seed_interval(excess.max(axis=1))}
    generalists = [name for name, m in methods.items() if m["kind"] != "specialist" and name in worst_by_seed]
    return {**own, "normalized_tasks": [task_names[i] for i in scaled],
            "left_out": [task_names[i] for i in range(k) if i not in scaled],
            "counts": records[0]["counts"], "methods": methods,
            "differences": worst_task_differences({name: worst_by_seed[name] for name in generalists})}


def worst_task_differences(worst_by_seed: dict[str, dict[int, float]]) -> list[dict]:
    """For each pair of methods (a before b in sorted order), the worst task's normalized return of a minus
    b's, paired by seed (docs/maths.md (65)), with its 95% interval and the verdict it supports: "a above b",
    "b above a" (the interval excludes 0) or "tie"."""
    out = []
    names = sorted(worst_by_seed)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds = sorted(set(worst_by_seed[a]) & set(worst_by_seed[b]))
            interval = seed_interval([worst_by_seed[a][s] - worst_by_seed[b][s] for s in seeds])
            out.append({"a": a, "b": b, "difference": interval, "verdict": verdict(interval, a, b)})
    return out


def verdict(interval: dict, a: str, b: str) -> str:
    """What the 95% interval of a - b supports (docs/maths.md (65)): "a above b", "b above a" or "tie"."""
    return f"{a} above {b}" if interval["low"] > 0 else f"{b} above {a}" if interval["high"] < 0 else "tie"


def verdicts(point: dict) -> list[str]:
    """The point's conclusions: every pair of methods whose worst-task difference is not a tie."""
    return [d["verdict"] for d in point["differences"] if d["verdict"] != "tie"]


def interval_cell(interval: dict | None) -> str:
    if interval is None:
        return "no scale"
    return f"{interval['mean']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def main_table(summary: dict, task_names: list[str]) -> str:
    """Markdown: one row per method of the main point, generalists and merges first."""
    point = summary["main"]
    head = ["method", "seeds", "worst task (normalized)", *[f"{t} (normalized)" for t in task_names],
            "worst held-out excess"]
    rows = sorted(point["methods"].items(), key=lambda item: (item[1]["kind"] == "specialist", item[0]))
    body = [[name, str(m["seeds"]), interval_cell(m["worst"]), *map(interval_cell, m["normalized"]),
             interval_cell(m["worst_excess"])]
            for name, m in rows]
    returns = ", ".join(f"{t} {r:.1f}" for t, r in zip(task_names, point["reference_returns"]))
    best = ", ".join(f"{t} {r:.1f}" for t, r in zip(task_names, point["specialist_returns"]))
    left_out = "".join(f"\n{line}.\n" for line in unscaled_lines(point, task_names))
    return (markdown_table(head, body, rule="---")
            + f"\n\nReturns: reference {returns}; specialists (mean over seeds) {best}.\n{left_out}")


def sweep_table(summary: dict, points: list) -> str:
    """Markdown: the worst task's normalized return at each sweep value, one row per (knob, loss, method)."""
    head = ["knob", "loss", "method", "value", "seeds", "worst task (normalized on the main scale)",
            "worst held-out excess"]
    body = [[point.sweep, point.loss.loss_type, name, f"{point.value:g}", str(m["seeds"]), interval_cell(m["worst"]),
             interval_cell(m["worst_excess"])]
            for point in points if point.sweep is not None
            for name, m in summary[point.name]["methods"].items() if m["kind"] != "specialist"]
    return markdown_table(head, body, rule="---") + "\n"


def differences_list(point: dict) -> str:
    """Markdown: each pair of methods whose worst-task difference over seeds excludes 0, with it."""
    def signed(d: dict) -> dict:  # the verdict's winner minus its loser, by the rule of :func:`verdict`
        return d["difference"] if d["difference"]["low"] > 0 else _negated(d["difference"])

    lines = [f"- {d['verdict']}: " + interval_cell(signed(d)) for d in point["differences"] if d["verdict"] != "tie"]
    return "\n".join(lines or ["- none: every pair's interval contains 0"]) + "\n"


def _negated(interval: dict) -> dict:
    return {**interval, "mean": -interval["mean"], "low": -interval["high"], "high": -interval["low"]}


def tables(summary: dict, points: list, task_names: list[str]) -> str:
    """table.md: the main comparison's table and its paired differences, then, with sweep points, the
    sweeps' table."""
    text = "## Main comparison\n\n" + main_table(summary, task_names)
    text += ("\n## Main comparison: methods that differ on the worst task (paired over seeds, 95%)\n\n"
             + differences_list(summary["main"]))
    if len(points) > 1:
        text += "\n## Sweeps: the worst task\n\n" + sweep_table(summary, points)
    return text
