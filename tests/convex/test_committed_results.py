"""The committed convex results (paper_figures/convex_rates) are what today's code computes.

In the default suite: every committed problem is regenerated and solved again (OPT, G, Bl, specialists),
and a stated part of the jobs is rerun and compared with the committed numbers: every rate job up to
T = 4096 (all losses and algorithms, all seeds), every worst-task job and every EXP3 sequence. The whole
reproduction, compared CSV by CSV as `amalab convex-rates` compares it, is the `slow` test
tests/test_cli.py::test_readme_reproduction_command.
"""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from amalab.convex.config import load_reproduction_config
from amalab.convex.optimum import solve
from amalab.convex.problems import ProblemSettings, make_problem
from amalab.convex.reproduction import plan_jobs

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "paper_figures" / "convex_rates"
CONFIG = ROOT / "experiments" / "convex_rates" / "config.toml"
#: the comparison's tolerance, as `amalab convex-rates` compares CSVs (cvxpy's solutions may differ by
#: ~1e-10 between machines, and a gap is a small difference of two larger numbers)
RTOL = 1e-6
#: rate jobs up to this horizon run in the default suite
SUITE_HORIZON = 4096


@pytest.fixture(scope="module")
def committed():
    return json.loads((COMMITTED / "results.json").read_text())


@pytest.fixture(scope="module")
def solved(committed):
    """Today's solve of every committed problem, by experiment (loss name for the rate problems)."""
    problems = {loss: entry for loss, entry in committed["rates"].items()}
    problems["worst_task"] = committed["worst_task"]
    out = {}
    for name, entry in problems.items():
        settings = dict(entry["problem"])
        loss, seed = settings.pop("loss"), settings.pop("seed")
        out[name] = solve(make_problem(loss, seed=seed, settings=ProblemSettings(**settings)))
    return out


def test_the_committed_run_used_the_shipped_config(committed):
    config = committed["config"]
    shipped = json.loads(json.dumps(asdict(load_reproduction_config(CONFIG))))
    for table in ("rates", "worst_task", "exp3", "checks"):
        assert config[table] == shipped[table], table
    assert config["seed"] == shipped["seed"]


def test_every_committed_problem_is_regenerated_and_solved_alike(committed, solved):
    """OPT, G, Bl and the specialists of every committed problem, recomputed (a generator or solver
    change that moves them makes the committed results stale)."""
    entries = dict(committed["rates"], worst_task=committed["worst_task"])
    for name, entry in entries.items():
        today = solved[name]
        assert today.opt_value == pytest.approx(entry["opt"], rel=1e-8), name
        assert today.G == pytest.approx(entry["G"], rel=1e-12), name
        assert today.Bl == pytest.approx(entry["Bl"], rel=1e-8), name
        np.testing.assert_allclose(today.specialists, entry["specialists"], rtol=1e-6, atol=1e-8, err_msg=name)


def _rerun(committed, solved, keep) -> dict:
    """Today's outputs of the jobs of the shipped config for which ``keep(name)`` holds, by job name."""
    config = load_reproduction_config(CONFIG)
    rate_solved = {loss: solved[loss] for loss in config.rates.losses}
    jobs, names = plan_jobs(config, rate_solved, solved["worst_task"])
    return {name: fn(**kwargs) for name, (fn, kwargs, _) in zip(names, jobs) if keep(name)}


def test_committed_jobs_are_reproduced(committed, solved):
    """Every rate job up to T = 4096, every worst-task job and every EXP3 sequence, against results.json."""
    outputs = _rerun(committed, solved, lambda name: name[0] != "rates" or int(name[3]) <= SUITE_HORIZON)
    horizons = committed["rates"]["dpo"]["horizons"]
    assert sum(name[0] == "rates" for name in outputs) == 4 * 4 * sum(T <= SUITE_HORIZON for T in horizons)
    for name, output in outputs.items():
        if name[0] == "rates":
            _, loss, algorithm, T = name
            entry = committed["rates"][loss]["algorithms"][algorithm]
            row = horizons.index(int(T))
            np.testing.assert_allclose(output["gap"][0], entry["gap"][row], rtol=RTOL, err_msg=str(name))
            if "duality_gap" in output:
                np.testing.assert_allclose(output["duality_gap"][0], entry["duality_gap"][row], rtol=RTOL)
        elif name[0] == "worst_task":
            entry = committed["worst_task"]["algorithms"][name[1]]
            for field in ("task_excess", "average_weights", "curve"):
                np.testing.assert_allclose(output[field], entry[field], rtol=RTOL, err_msg=f"{name} {field}")
        else:
            entry = committed["exp3"]["sequences"][name[1]]
            for field in ("mean_regret", "stderr", "bound", "gamma"):
                np.testing.assert_allclose(output[field], entry[field], rtol=RTOL, err_msg=f"{name} {field}")
