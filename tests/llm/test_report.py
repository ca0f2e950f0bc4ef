"""The experiment report: spreads over seeds against the statistics module, the summary's shape, the CSV."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amalab.llm.report import CSV_METRICS, summarize, summary_table, write_summary
from amalab.stats import spread


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=12))
def test_spread_is_the_mean_sample_std_min_and_max(values):
    s = spread(values)
    assert s["mean"] == pytest.approx(statistics.fmean(values), rel=1e-9, abs=1e-9)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    assert s["std"] == pytest.approx(std, rel=1e-7, abs=1e-7)
    assert (s["min"], s["max"], s["n"]) == (min(values), max(values), len(values))


def records():
    def run(method, seed, a, b):
        worst = max(a, b)
        return {"method": method, "seed": seed, "worst_excess": worst, "worst_task": "a" if a >= b else "b",
                "tasks": {"a": {"n": 4, "loss": 0.7, "excess": a, "accuracy": 0.5, "margin": 0.1},
                          "b": {"n": 4, "loss": 0.6, "excess": b, "accuracy": 0.75, "margin": 0.2}}}

    return [run("standard", 0, 0.1, 0.3), run("ama-r", 0, 0.2, 0.1), run("ama-r", 1, 0.4, 0.2)]


def test_summary_groups_runs_by_method_over_seeds():
    summary = summarize(["a", "b"], records())
    assert list(summary["methods"]) == ["standard", "ama-r"] and summary["runs"] == records()
    amar = summary["methods"]["ama-r"]
    assert amar["seeds"] == 2
    assert amar["worst_excess"]["mean"] == pytest.approx(0.3)
    assert amar["worst_excess"]["std"] == pytest.approx(statistics.stdev([0.2, 0.4]))
    assert amar["tasks"]["b"]["excess"]["mean"] == pytest.approx(0.15)
    assert "n" not in amar["tasks"]["a"]  # the pair count is not a metric to average
    lines = summary_table(summary).splitlines()
    counted = records()
    counted[1].update(steps=4, tokens=100)
    counted[2].update(steps=4, tokens=131)
    amar_counted = summarize(["a", "b"], counted)["methods"]["ama-r"]
    assert (amar_counted["steps"], amar_counted["tokens"]) == (4, 116)  # the means of (4, 4) and (100, 131)
    assert lines[0].split()[:5] == ["method", "seeds", "steps", "tokens", "worst"] and len(lines) == 4
    assert lines[3].split()[:6] == ["ama-r", "2", "0", "0", "0.3000", f"({statistics.stdev([0.2, 0.4]):.4f})"]


def test_summary_csv_has_one_row_per_run_and_task(tmp_path):
    write_summary(tmp_path, summarize(["a", "b"], records()))
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 3 * 2 and list(rows[0]) == ["method", "seed", "task", *CSV_METRICS, "worst_excess",
                                                  "run_dir"]
    last = rows[-1]
    assert (last["method"], last["seed"], last["task"], last["success"]) == ("ama-r", "1", "b", "")
    assert math.isclose(float(last["excess"]), 0.2) and math.isclose(float(last["worst_excess"]), 0.4)


def test_summary_markdown_quotes_the_summary_and_report_writes_it(tmp_path, capsys):
    from amalab.llm.report import report

    rows = records()
    for r, w in zip(rows, ([0.5, 0.5], [0.2, 0.8], [0.4, 0.6])):
        r["average_weights"] = w
    means = {n: {"in_sample_train": 0.5, "train": 0.6, "in_sample_held_out": 0.65, "held_out": 0.7} for n in "ab"}
    summary = report(tmp_path, ["a", "b"], rows, specialist_losses={"definition": "cross-fit 2", "means": means})
    text = (tmp_path / "summary.md").read_text()
    # ama-r over its two seeds: worst excess 0.2 and 0.4, a's excess 0.2 and 0.4, b's 0.1 and 0.2
    sd = statistics.stdev([0.2, 0.4])
    assert (f"| ama-r | 2 | 0 | 0 | 0.3000 ({sd:.4f}) | 0.3000 ({sd:.4f}) | 0.1500 ({statistics.stdev([0.1, 0.2]):.4f})"
            in text)
    assert "| ama-r - standard | 1 | -0.1000 |" in text  # standard has seed 0 only: one paired difference
    assert f"| ama-r | 0.3000 ({statistics.stdev([0.2, 0.4]):.4f}) | 0.7000 ({statistics.stdev([0.8, 0.6]):.4f}) |" in text
    assert "| a | 0.5000 | 0.6000 | 0.6500 | 0.7000 |" in text
    assert summary["specialist_losses"]["definition"] == "cross-fit 2"
