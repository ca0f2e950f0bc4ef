"""The across-bodies report (amalab/control/across_bodies.py) against hand computation and scipy."""

import numpy as np
import pytest
from scipy import stats

from amalab.control.across_bodies import PAIRS, across_bodies, across_bodies_table


def _summary(worst: dict[str, list[float]]) -> dict:
    methods = {name: {"worst": {"mean": float(np.mean(v)), "low": min(v), "high": max(v), "n": len(v)},
                      "worst_by_seed": v} for name, v in worst.items()}
    return {"main": {"normalized_tasks": ["a"], "left_out": ["b"], "methods": methods}}


def test_per_body_and_pooled_differences():
    one = _summary({"standard": [0.0, 0.1, 0.2], "ama-r": [1.0, 1.2, 1.1], "ama-s": [0.1, 0.0, 0.3],
                    "linear": [0.9, 1.4, 1.0]})
    two = _summary({"standard": [0.5, 0.4], "ama-r": [0.6, 0.6], "ama-s": [0.5, 0.6], "linear": [2.0, 2.1]})
    report = across_bodies({"Cheetah": one, "Hop": two})
    first = report["bodies"]["Cheetah"]["differences"]["ama-r - standard"]
    low, high = stats.t.interval(0.95, 2, loc=np.mean([1.0, 1.1, 0.9]), scale=stats.sem([1.0, 1.1, 0.9]))
    assert first["difference"]["low"] == pytest.approx(low) and first["difference"]["high"] == pytest.approx(high)
    assert first["verdict"] == "ama-r above standard"
    pooled = report["pooled"]["ama-r - linear"]
    values = [0.1, -0.2, 0.1, -1.4, -1.5]  # every (body, seed) difference
    assert pooled["difference"]["mean"] == pytest.approx(np.mean(values)) and pooled["difference"]["n"] == 5
    low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert pooled["difference"]["low"] == pytest.approx(low) and pooled["verdict"] == "tie"
    assert report["bodies"]["Hop"]["differences"]["ama-r - linear"]["verdict"] == "linear above ama-r"
    table = across_bodies_table(report)
    assert table.count("\n| Cheetah |") == 2 and "| all bodies (pooled) |" in table
    assert len(table.splitlines()[2].split(" | ")) == len(PAIRS) + 1


def test_a_method_not_run_on_a_body_is_said():
    report = across_bodies({"Ant": _summary({"standard": [0.0, 0.1], "ama-r": [0.2, 0.4]})})
    assert report["bodies"]["Ant"]["differences"]["ama-s - standard"]["verdict"] == "not run"
    assert "not run" in across_bodies_table(report)
