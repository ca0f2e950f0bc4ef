"""The report of an LLM experiment: summary.json, summary.csv, the printed table and the figures.

Per method, every held-out metric is summarized over seeds (mean, std, min, max); the worst-task excess is
the experiment's headline number (docs/maths.md section 2), reported per method beside each task's clipped
excess over its specialist and its preference accuracy, with the optimizer steps and training tokens the
method spent, and the AMA methods' paired differences against standard and the best merge
(:mod:`amalab.llm.paired_comparison`).
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from amalab.atomic_write import write_json_atomic, write_text_atomic
from amalab.llm.figures import make_figures
from amalab.llm.paired_comparison import comparisons
from amalab.markdown import markdown_table
from amalab.stats import spread

#: the per-task metrics of summary.csv, in its column order
CSV_METRICS = ("loss", "excess", "accuracy", "margin", "success")
#: a run's record (and its method's summary) naming the generated tasks whose generation was skipped, and why
#: (amalab.llm.generation_scores: not under [model] fsdp): their success column says so instead of a number
SKIPPED_GENERATION = "generation_skipped"


def summarize(task_names: list[str], records: list[dict]) -> dict:
    """Per method, the spread over seeds of the worst-task excess and of every per-task metric."""
    methods: dict[str, dict] = {}
    for r in records:
        entry = methods.setdefault(r["method"], {"seeds": 0, "tasks": {n: {} for n in task_names},
                                                 "worst_excess": []})
        entry["seeds"] += 1
        entry["worst_excess"].append(r.get("worst_excess", float("nan")))
        for n in task_names:
            for metric, value in r["tasks"].get(n, {}).items():
                entry["tasks"][n].setdefault(metric, []).append(value)
    summary = {"tasks": task_names, "methods": {}, "runs": records}
    for method, entry in methods.items():
        runs = [r for r in records if r["method"] == method]
        summary["methods"][method] = {
            "seeds": entry["seeds"],
            # the mean over seeds, like every other column (a seed's tokens depend on its draws)
            "steps": round(statistics.fmean(r.get("steps", 0) for r in runs)),
            "tokens": round(statistics.fmean(r.get("tokens", 0) for r in runs)),
            "worst_excess": spread(entry["worst_excess"]),
            "tasks": {n: {m: spread(v) for m, v in metrics.items() if m != "n"}
                      for n, metrics in entry["tasks"].items()},
        }
        skipped = sorted({t for r in runs for t in r.get(SKIPPED_GENERATION, {}).get("tasks", [])})
        if skipped:
            summary["methods"][method][SKIPPED_GENERATION] = skipped
        if all("average_weights" in r for r in runs):  # the mixer's running average of its task weights
            summary["methods"][method]["average_weights"] = {
                n: spread([r["average_weights"][i] for r in runs]) for i, n in enumerate(task_names)}
    summary["paired"] = comparisons(records, summary["methods"])
    return summary


def write_summary(out: Path, summary: dict) -> None:
    """summary.json, and summary.csv: one row per run and task; each run names its folder (``run_dir``,
    relative to ``out``), the argument ``amalab llm export`` takes. (summary.md: :func:`summary_markdown`.)"""
    write_json_atomic(out / "summary.json", summary, indent=1)
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["method", "seed", "task", *CSV_METRICS, "worst_excess", "run_dir"])
    for r in summary["runs"]:
        for n in summary["tasks"]:
            w.writerow([r["method"], r["seed"], n] + [_csv_metric(r, n, m) for m in CSV_METRICS]
                       + [r.get("worst_excess", ""), r.get("run_dir", "")])
    write_text_atomic(out / "summary.csv", rows.getvalue())


def _csv_metric(record: dict, task: str, metric: str):
    """A run's ``metric`` of ``task`` in summary.csv; a skipped generation's success says why it is missing."""
    skipped = record.get(SKIPPED_GENERATION, {})
    if metric == "success" and task in skipped.get("tasks", ()):
        return f"skipped: {skipped['reason']}"
    return record["tasks"].get(task, {}).get(metric, "")


def _summary_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows: per method, seeds, steps, tokens, worst-task excess, per-task
    excess and accuracy, and the generation success of the verifiable tasks; mean (std) over seeds."""
    names = summary["tasks"]
    generated = [n for n in names if any("success" in m["tasks"][n] or n in m.get(SKIPPED_GENERATION, ())
                                         for m in summary["methods"].values())]
    header = (["method", "seeds", "steps", "tokens", "worst excess"] + [f"{n} excess" for n in names]
              + [f"{n} acc" for n in names] + [f"{n} success" for n in generated])
    rows = [[method, str(m["seeds"]), str(m.get("steps", "")), str(m.get("tokens", "")), _fmt(m, "worst_excess")]
            + [_fmt(m["tasks"][n], "excess") for n in names] + [_fmt(m["tasks"][n], "accuracy") for n in names]
            + [_success(m, n) for n in generated]
            for method, m in summary["methods"].items()]
    return header, rows


def _success(method: dict, task: str) -> str:
    """The success cell of a method's row: "skipped" where its generation was (under [model] fsdp)."""
    if "success" not in method["tasks"][task] and task in method.get(SKIPPED_GENERATION, ()):
        return "skipped (fsdp)"
    return _fmt(method["tasks"][task], "success")


def _fmt(entry: dict, metric: str) -> str:
    s = entry.get(metric)
    if s is None:
        return "-"
    return f"{s['mean']:.4f}" + (f" ({s['std']:.4f})" if s["n"] > 1 else "")


def summary_table(summary: dict) -> str:
    """The summary as a plain-text table (what a run prints)."""
    header, rows = _summary_rows(summary)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def paired_table(rows: list[dict]) -> str:
    """A markdown table of the paired differences (:mod:`amalab.llm.paired_comparison`): method - against,
    mean and 95% interval per metric."""
    cells: dict[tuple[str, str], dict] = {}
    for row in rows:
        cells.setdefault((row["method"], row["against"]), {})[row["metric"]] = row

    def fmt(row: dict | None) -> str:
        if row is None:
            return "-"
        interval = "" if row["low"] is None else f" [{row['low']:+.4f}, {row['high']:+.4f}]"
        return f"{row['mean']:+.4f}{interval}"

    header = ["method - against", "n", "worst-task excess (lower: method better)",
              "worst generated task's success (higher: method better)"]
    body = [[f"{method} - {against}", str(max(r["n"] for r in metrics.values())),
             fmt(metrics.get("worst_excess")), fmt(metrics.get("worst_success"))]
            for (method, against), metrics in cells.items()]
    return markdown_table(header, body)


def summary_markdown(summary: dict) -> str:
    """summary.md: the summary table, the paired differences, the adaptive mixers' average weights and the
    specialists' mean losses, as markdown tables (what a README quotes)."""
    parts = ["Mean (std) over seeds.", "", markdown_table(*_summary_rows(summary))]
    if summary.get("paired"):
        parts += ["", "Paired differences, method - against, same seed: mean [95% t-interval].", "",
                  paired_table(summary["paired"])]
    names = summary["tasks"]
    weighted = [(m, e["average_weights"]) for m, e in summary["methods"].items() if "average_weights" in e]
    if weighted:
        parts += ["", "The mixers' average task weights over training, mean (std) over seeds.", "",
                  markdown_table(["method", *names], [[m, *(_fmt(w, n) for n in names)] for m, w in weighted])]
    losses = summary.get("specialist_losses")
    if losses:
        columns = ["in_sample_train", "train", "in_sample_held_out", "held_out"]
        parts += ["", f"Mean specialist loss s(z) per task: in-sample and {losses['definition']}.", "",
                  markdown_table(["task", "in-sample, train", f"{losses['definition']}, train",
                                  "in-sample, held-out", f"{losses['definition']}, held-out"],
                                 [[n, *(f"{losses['means'][n][c]:.4f}" for c in columns)] for n in names])]
    return "\n".join(parts) + "\n"


def report(out: Path, task_names: list[str], records: list[dict], write: bool = True,
           specialist_losses: dict | None = None) -> dict:
    """Summarize ``records``; with ``write`` (rank 0), write the summary and figures and print the table.
    ``specialist_losses``: the definition of s(z) and its means per task, kept in the summary."""
    summary = summarize(task_names, records)
    if specialist_losses is not None:
        summary["specialist_losses"] = specialist_losses
    if write:
        write_summary(out, summary)
        write_text_atomic(out / "summary.md", summary_markdown(summary))
        paths = make_figures(out, summary)
        print(summary_table(summary))  # the result: printed even with --quiet
        if summary["paired"]:
            print(paired_table(summary["paired"]))
        print("wrote " + ", ".join(str(p) for p in [out / "summary.json"] + paths))
    return summary
