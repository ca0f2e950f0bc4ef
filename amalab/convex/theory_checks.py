"""What the rate reproduction must show (docs/maths.md section 6), checked on a results record.

Every gate is a config value (``[checks]``, recorded in results.json) and is printed with its result:
  - bound:     every measured primal gap is under its algorithm's bound;
  - tolerance: no gap (primal or duality) is below -gap_tolerance (which would mean cvxpy's OPT, or its
               dual minimum, is not optimal);
  - slope:     the least-squares slope of log(median primal gap) against log(T) over the last
               slope_horizons horizons is <= slope_gate (theory: -1/2), reported with its standard error;
  - duality:   for deterministic runs, the duality gap of the averaged pair (theta_bar, alpha_bar) is at
               least the primal gap (weak duality) and its slope is <= duality_slope_gate;
  - exp3:      EXP3's mean regret is under (e - 1) gamma G_max + k ln k / gamma, up to sampling error: it
               fails when the mean exceeds the bound by more than exp3_z standard errors (regret on
               switching sequences is heavy-tailed, so a finite-seed mean can sit above its expectation);
  - worst-task: no algorithm beats OPT on the worst-task problem (by more than gap_tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amalab.convex.record import log_log_fit


@dataclass(frozen=True)
class Check:
    """One check: what it is about, the gate it applies, what was measured, and whether it passed."""

    where: str
    gate: str
    measured: str
    passed: bool

    def line(self) -> str:
        return f"{'pass' if self.passed else 'FAIL'}  {self.where:<26} {self.gate:<44} {self.measured}"


def check_rate_curve(where: str, horizons, gap, bound, gates: dict, duality_gap=None) -> list[Check]:
    """The checks of one (loss, algorithm) rate curve: ``gap`` is (horizons, seeds), ``bound`` (horizons,)."""
    horizons, gap, bound = np.asarray(horizons), np.asarray(gap, dtype=float), np.asarray(bound, dtype=float)
    tol, n = gates["gap_tolerance"], gates["slope_horizons"]
    ratio = gap.max(axis=1) / bound
    worst = int(np.argmax(ratio))
    checks = [
        Check(where, "gap <= bound at every T and seed", f"largest gap/bound {ratio[worst]:.3g} at T={horizons[worst]}",
              bool(np.all(gap <= bound[:, None]))),
        Check(where, f"gap >= -{tol:g}", f"smallest gap {gap.min():.3g}", bool(gap.min() >= -tol)),
    ]
    median = np.median(gap, axis=1)
    slope, se = log_log_fit(horizons[-n:], median[-n:])
    checks.append(Check(where, f"slope of median gap, last {n} T <= {gates['slope_gate']:g}",
                        f"{slope:.3f} (s.e. {se:.3f})", bool(slope <= gates["slope_gate"])))
    if duality_gap is not None:
        dual = np.asarray(duality_gap, dtype=float)
        below = dual - gap[:, 0]
        checks.append(Check(where, f"duality gap >= primal gap - {tol:g}", f"smallest difference {below.min():.3g}",
                            bool(below.min() >= -tol)))
        d_slope, d_se = log_log_fit(horizons[-n:], dual[-n:])
        checks.append(Check(where, f"slope of duality gap, last {n} T <= {gates['duality_slope_gate']:g}",
                            f"{d_slope:.3f} (s.e. {d_se:.3f})", bool(d_slope <= gates["duality_slope_gate"])))
    return checks


def check_results(record: dict) -> list[Check]:
    """Every check of a (validated) results record, with the gates recorded in its config."""
    gates = record["config"]["checks"]
    tol, z = gates["gap_tolerance"], gates["exp3_z"]
    checks = []
    for loss, entry in record["rates"].items():
        for algorithm, r in entry["algorithms"].items():
            checks += check_rate_curve(f"{loss}/{algorithm}", entry["horizons"], r["gap"], r["bound"], gates,
                                       r.get("duality_gap"))
    for sequence, r in record["exp3"]["sequences"].items():
        excess = (np.asarray(r["mean_regret"]) - np.asarray(r["bound"])) / np.maximum(r["stderr"], 1e-300)
        worst = int(np.argmax(excess))
        checks.append(Check(f"exp3/{sequence}", f"mean regret <= bound + {z:g} s.e. at every T",
                            f"largest (regret - bound)/s.e. {excess[worst]:.3g} at T={r['horizons'][worst]}",
                            bool(np.all(excess <= z))))
    wt = record["worst_task"]
    for algorithm, r in wt["algorithms"].items():
        worst = float(np.max(r["task_excess"], axis=1).min())
        checks.append(Check(f"worst_task/{algorithm}", f"worst-task excess >= OPT - {tol:g}",
                            f"smallest {worst:.6g} (OPT {wt['opt']:.6g})", worst >= wt["opt"] - tol))
    return checks


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]
