"""The suite across bodies: for each body's main comparison and pooled over bodies, the worst task's
difference between AMA and its rivals (docs/maths.md (65), (66)).

Per body, the difference is the body's own paired difference over seeds. Pooled, it is the mean of every
(body, seed) difference with its t-interval over all of them: the differences between bodies count as
noise, which makes the interval wider (conservative), not narrower.
"""

from __future__ import annotations

from pathlib import Path

from amalab.atomic_write import write_json_atomic, write_text_atomic
from amalab.control.summary import interval_cell, seed_interval, verdict
from amalab.markdown import markdown_table

#: the comparisons the suite reports across bodies: AMA-R and AMA-S against standard and the linear merge
PAIRS = (("ama-r", "standard"), ("ama-s", "standard"), ("ama-r", "linear"), ("ama-s", "linear"))
SHOWN = ("standard", "ama-r", "ama-s", "linear")


def _paired(point: dict, a: str, b: str) -> list[float] | None:
    methods = point["methods"]
    if a not in methods or b not in methods or methods[a]["worst_by_seed"] is None:
        return None
    return [x - y for x, y in zip(methods[a]["worst_by_seed"], methods[b]["worst_by_seed"])]


def _verdict(interval: dict | None, a: str, b: str) -> str:
    return "not run" if interval is None else verdict(interval, a, b)


def across_bodies(summaries: dict[str, dict]) -> dict:
    """``summaries``: body name -> its summary.json. Per body and pooled: each pair's worst-task difference
    (interval and verdict), and the shown methods' worst task."""
    bodies, pooled = {}, {f"{a} - {b}": [] for a, b in PAIRS}
    for body, summary in summaries.items():
        point = summary["main"]
        row = {"normalized_tasks": point["normalized_tasks"], "left_out": point["left_out"],
               "worst": {m: point["methods"][m]["worst"] for m in SHOWN if m in point["methods"]}, "differences": {}}
        for a, b in PAIRS:
            values = _paired(point, a, b)
            interval = None if values is None else seed_interval(values)
            row["differences"][f"{a} - {b}"] = {"difference": interval, "verdict": _verdict(interval, a, b)}
            pooled[f"{a} - {b}"] += values or []
        bodies[body] = row
    all_bodies = {}
    for (a, b), (name, values) in zip(PAIRS, pooled.items()):
        interval = seed_interval(values) if values else None
        all_bodies[name] = {"difference": interval, "verdict": _verdict(interval, a, b)}
    return {"bodies": bodies, "pooled": all_bodies}


def across_bodies_table(report: dict) -> str:
    """Markdown: one row per body and one pooled, a column per pair; then each body's shown methods."""
    head = ["body", *[f"{a} - {b}" for a, b in PAIRS]]
    cell = lambda d: f"{interval_cell(d['difference'])} ({d['verdict']})" if d["difference"] else "not run"  # noqa: E731
    rows = [[body, *(cell(r["differences"][f"{a} - {b}"]) for a, b in PAIRS)] for body, r in report["bodies"].items()]
    rows.append(["all bodies (pooled)", *(cell(report["pooled"][f"{a} - {b}"]) for a, b in PAIRS)])
    worst = [[body, ", ".join(r["normalized_tasks"]), *(interval_cell(r["worst"].get(m)) if m in r["worst"] else "not run"
                                                         for m in SHOWN)] for body, r in report["bodies"].items()]
    return ("## Worst task, paired differences over seeds (95%)\n\n" + markdown_table(head, rows, rule="---")
            + "\n\n## Worst task by body (normalized, over the tasks with a scale)\n\n"
            + markdown_table(["body", "tasks with a scale", *SHOWN], worst, rule="---") + "\n")


def write_across_bodies(summaries: dict[str, dict], folder: Path) -> dict:
    """across_bodies.json and across_bodies.md in ``folder``."""
    report = across_bodies(summaries)
    write_json_atomic(Path(folder) / "across_bodies.json", report, indent=1)
    write_text_atomic(Path(folder) / "across_bodies.md", across_bodies_table(report))
    return report
