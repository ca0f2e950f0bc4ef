"""Paired differences (docs/maths.md section 12, (56)-(57)): seeds paired, a single-run method paired with every
seed, the interval Student's t by hand."""

from __future__ import annotations

import math

import pytest

from amalab.llm.paired_comparison import comparisons, seed_paired_difference, worst_success
from amalab.llm.report import paired_table


def run(method, seed, worst, successes=None):
    tasks = {"a": {"excess": worst}, "g": {}} if successes is None else {
        "a": {"excess": worst}, **{f"g{i}": {"success": s} for i, s in enumerate(successes)}}
    return {"method": method, "seed": seed, "worst_excess": worst, "tasks": tasks}


def test_the_interval_is_students_t_over_the_seed_paired_differences():
    a = {s: run("ama-r", s, w) for s, w in enumerate([0.10, 0.14, 0.09])}
    b = {s: run("standard", s, w) for s, w in enumerate([0.15, 0.16, 0.16])}
    result = seed_paired_difference(a, b, "worst_excess")
    d = [-0.05, -0.02, -0.07]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert result["differences"] == pytest.approx(d)
    assert (result["mean"], result["low"], result["high"]) == pytest.approx((mean, mean - half, mean + half))


def test_only_shared_seeds_are_paired_and_a_deterministic_run_pairs_with_every_seed():
    a = {s: run("ama-s", s, 0.1 * (s + 1)) for s in range(3)}
    b = {s: run("standard", s, 0.2) for s in (1, 2, 5)}
    assert seed_paired_difference(a, b, "worst_excess")["differences"] == pytest.approx([0.0, 0.1])
    merge = {0: run("merge-ties", 0, 0.05)}
    assert seed_paired_difference(a, merge, "worst_excess", broadcast=True)["differences"] == pytest.approx(
        [0.05, 0.15, 0.25])
    # a method with one finished seed is not a deterministic one: only its own seed pairs, and n = 1 has no interval
    one = seed_paired_difference(a, {0: run("standard", 0, 0.3)}, "worst_excess")
    assert one["n"] == 1 and one["low"] is None and one["high"] is None


def test_worst_success_is_the_lowest_generated_task_and_comparisons_pick_the_best_merge():
    assert worst_success(run("x", 0, 0.1, [0.5, 0.25])) == 0.25 and worst_success(run("x", 0, 0.1)) is None
    records = ([run("standard", s, 0.2, [0.3, 0.4]) for s in range(2)]
               + [run("ama-r", s, 0.1, [0.5, 0.35]) for s in range(2)]
               + [run("ama-r-in-sample", s, 0.12 + 0.01 * s, [0.5, 0.3]) for s in range(2)]
               + [run("merge-linear", 0, 0.3, [0.1, 0.1]), run("merge-ties", 0, 0.15, [0.2, 0.6])])
    methods = {"merge-linear": {"worst_excess": {"mean": 0.3}}, "merge-ties": {"worst_excess": {"mean": 0.15}}}
    rows = {(r["method"], r["against"], r["metric"]): r for r in comparisons(records, methods)}
    assert set(rows) == {("ama-r", against, metric) for against in ("standard", "merge-ties", "ama-r-in-sample")
                         for metric in ("worst_excess", "worst_success")}
    assert rows["ama-r", "ama-r-in-sample", "worst_excess"]["differences"] == pytest.approx([-0.02, -0.03])
    assert rows["ama-r", "merge-ties", "worst_excess"]["n"] == 2  # a deterministic merge pairs with every seed
    assert rows["ama-r", "standard", "worst_success"]["mean"] == pytest.approx(0.05)
    assert rows["ama-r", "merge-ties", "worst_excess"]["mean"] == pytest.approx(-0.05)
    table = paired_table(list(rows.values()))
    assert "| ama-r - standard | 2 | -0.1000 [-0.1000, -0.1000] | +0.0500 [+0.0500, +0.0500] |" in table
