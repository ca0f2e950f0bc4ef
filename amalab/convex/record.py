"""Assembly of the results record (results.json) from the jobs' outputs, and the slope fits it reports."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict

import numpy as np

import amalab
from amalab.convex.algorithms import ALGORITHMS, RATE_ALGORITHMS, gap_bound
from amalab.convex.exp3_regret import SEQUENCES
from amalab.convex.optimum import SolvedProblem


def log_log_fit(horizons, values) -> tuple[float, float]:
    """Least-squares slope of log(value) against log(T) and its standard error (nan if a value is <= 0).

    The standard error is the ordinary one from the fit's residuals, sqrt(s^2 / sum (x - xbar)^2) with
    s^2 = RSS / (n - 2); with two points it is 0 (the line is exact).
    """
    x, y = np.log(np.asarray(horizons, dtype=float)), np.asarray(values, dtype=float)
    if len(x) < 2 or not np.all(y > 0):
        return math.nan, math.nan
    y = np.log(y)
    xc = x - x.mean()
    slope = float(xc @ (y - y.mean()) / (xc @ xc))
    if len(x) == 2:
        return slope, 0.0
    residuals = y - y.mean() - slope * xc
    return slope, float(math.sqrt(residuals @ residuals / (len(x) - 2) / (xc @ xc)))


def solved_record(solved: SolvedProblem) -> dict:
    return dict(problem=solved.problem.settings, clip=solved.clip, opt=solved.opt_value,
                solver_opt=solved.solver_opt_value, D=solved.D, G=solved.G, Bl=solved.Bl,
                specialists=solved.specialists.tolist())


def rate_entry(algorithm: str, solved: SolvedProblem, horizons: list[int], output: dict, slope_horizons: int
               ) -> dict:
    """Median and quartiles over seeds, the bound, and the tail slopes (with standard errors)."""
    gap = np.asarray(output["gap"])
    median = np.median(gap, axis=1)
    tail = slice(len(horizons) - slope_horizons, None)
    slope, slope_se = log_log_fit(horizons[tail], median[tail])
    entry = dict(gap=output["gap"], median=median.tolist(),
                 q25=np.quantile(gap, 0.25, axis=1).tolist(), q75=np.quantile(gap, 0.75, axis=1).tolist(),
                 bound=gap_bound(algorithm, solved, horizons).tolist(), slope=slope, slope_se=slope_se,
                 slope_all=log_log_fit(horizons, median)[0], label=RATE_ALGORITHMS[algorithm][0])
    if "duality_gap" in output:
        dual = np.asarray(output["duality_gap"])
        entry["duality_gap"] = dual.tolist()
        entry["duality_slope"], entry["duality_slope_se"] = log_log_fit(horizons[tail], dual[tail])
    return entry


def build_record(config, solved: dict, worst_solved: SolvedProblem, keys: list[tuple], outputs: list[dict],
                 elapsed_s: float) -> dict:
    """The results record: config, machine, and one entry per experiment (what results.json holds)."""
    rates, worst = config.rates, config.worst_task
    record = dict(amalab_version=amalab.__version__, config=asdict(config),
                  machine=dict(cores=os.cpu_count(), python=platform.python_version(),
                               platform=platform.platform()),
                  rates={loss: dict(**solved_record(solved[loss]), horizons=rates.horizons,
                                    slope_horizons=config.checks.slope_horizons, algorithms={})
                         for loss in rates.losses},
                  worst_task=dict(**solved_record(worst_solved), horizon=worst.horizon,
                                  task_names=[f"task {i} (n={n})" for i, n in enumerate(worst.problem.sizes)],
                                  algorithms={}),
                  exp3=dict(k=config.exp3.k, sequences={}))
    per_horizon: dict[tuple[str, str], dict[int, dict]] = {}
    for key, output in zip(keys, outputs):
        if key[0] == "rates":  # one job per (loss, algorithm, horizon): joined below in the config's order
            _, loss, algorithm, horizon = key
            per_horizon.setdefault((loss, algorithm), {})[int(horizon)] = output
        elif key[0] == "worst_task":
            record["worst_task"]["algorithms"][key[1]] = dict(**output, label=ALGORITHMS[key[1]])
        else:
            record["exp3"]["sequences"][key[1]] = dict(**output, description=SEQUENCES[key[1]])
    for (loss, algorithm), by_horizon in per_horizon.items():
        outputs_in_order = [by_horizon[T] for T in rates.horizons]
        joined = {field: [row for output in outputs_in_order for row in output[field]]
                  for field in outputs_in_order[0]}
        record["rates"][loss]["algorithms"][algorithm] = rate_entry(
            algorithm, solved[loss], rates.horizons, joined, config.checks.slope_horizons)
    record["elapsed_s"] = elapsed_s
    return record
