"""benchmarks/trl_step_pooled.py: the pooled median of several runs' per-round ratios and its two-stage
(run, then round) bootstrap interval, against an enumeration."""

from __future__ import annotations

import itertools
import json
import statistics

import numpy as np
import pytest

from benchmarks.trl_step import _median_interval
from benchmarks.trl_step_pooled import cluster_interval, main, pooled


def write_run(folder, per_round, variant="ama-ama-s", system=None):
    folder.mkdir(parents=True)
    block = {"ratio_vs_trl": {variant: {"cycle": {"per_round": per_round}, "step": {"per_round": per_round},
                                        "system": {"per_round": system or per_round}}}}
    (folder / "results.json").write_text(json.dumps({"models": {"smollm2": block}}))


def test_pooled_median_is_the_median_of_every_round(tmp_path):
    runs = [[0.99, 1.01, 1.07], [1.03, 0.95], [1.00, 1.10, 1.02, 0.98]]
    for i, run in enumerate(runs):
        write_run(tmp_path / f"run{i}", run)
    summary = main([str(tmp_path / f"run{i}") for i in range(3)])
    every = [x for run in runs for x in run]
    assert summary["median"] == pytest.approx(statistics.median(every))
    assert summary["rounds"] == 9 and summary["slower_rounds"] == sum(x > 1 for x in every)
    assert [r["median"] for r in summary["runs"]] == pytest.approx([statistics.median(r) for r in runs])


def test_cluster_interval_holds_the_run_to_run_spread_that_a_rounds_bootstrap_misses():
    """Four runs, each the same ratio in all its 5 rounds: resampling rounds within a run changes nothing, so
    the two-stage bootstrap's median is that of the runs drawn. Drawn 4 of 4 with replacement, the pooled
    median is the mean of the 2nd and 3rd smallest drawn values (each run gives 5 of the 20 rounds); by
    enumeration of the 256 draws it is the smallest run's 1.00 with probability 13/256 > 2.5 % and the
    largest's 1.06 likewise, so the interval is [1.00, 1.06]. A bootstrap of the 20 pooled rounds alone is
    far narrower."""
    levels = [1.00, 1.02, 1.04, 1.06]
    runs = [[x] * 5 for x in levels]
    exact = [(sorted(d)[1] + sorted(d)[2]) / 2 for d in itertools.product(levels, repeat=4)]
    assert exact.count(1.00) == exact.count(1.06) == 13
    assert cluster_interval(runs) == pytest.approx([1.00, 1.06])
    naive = _median_interval([x for run in runs for x in run])
    assert naive[0] > 1.00 and naive[1] < 1.06


def test_cluster_interval_of_identical_runs_is_one_point_and_of_one_run_none():
    assert cluster_interval([[1.01] * 4, [1.01] * 3]) == pytest.approx([1.01, 1.01])
    assert cluster_interval([[0.9, 1.1, 1.0]]) is None
    summary = pooled([[0.9, 1.1, 1.0]])
    assert summary["median_interval_95"] is None and summary["median"] == pytest.approx(1.0)


def test_a_folder_without_the_variant_is_refused_in_one_line(tmp_path, capsys):
    write_run(tmp_path / "run0", [1.0, 1.0], variant="ama-standard")
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "run0")])
    message = str(exit.value)
    assert "run0/results.json" in message and "'ama-ama-s'" in message and "\n" not in message
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "nowhere")])
    assert "nowhere/results.json" in str(exit.value)


def test_rounds_without_a_cpu_time_ratio_are_left_out(tmp_path):
    write_run(tmp_path / "run0", [1.0, 1.1, 1.2], system=[None, 2.0, 4.0])
    write_run(tmp_path / "run1", [1.0, 1.0], system=[3.0, None])
    summary = main([str(tmp_path / "run0"), str(tmp_path / "run1"), "--kind", "system"])
    assert summary["rounds"] == 3 and summary["median"] == pytest.approx(3.0)
    write_run(tmp_path / "run2", [1.0], system=[None])
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "run2"), "--kind", "system"])
    assert "run2/results.json: no round has a system ratio" in str(exit.value)
