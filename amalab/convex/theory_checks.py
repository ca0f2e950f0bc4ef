"""What the rate reproduction must show (spec section 5), checked on a results record.

  - every measured gap is under its theoretical bound;
  - no gap is below -tolerance (which would mean cvxpy's OPT is not optimal);
  - the slope of log(median gap) against log(T), fitted on T >= slope_from, is <= ``max_slope``
    (theory: -1/2; before the asymptotic regime the gap need only stay under its bound);
  - EXP3's mean regret is under (e - 1) gamma G_max + k ln k / gamma, up to sampling error: the check
    fails when the mean exceeds the bound by more than ``z`` standard errors (regret on switching
    sequences is heavy-tailed, so a finite-seed mean can sit above the expectation it estimates);
  - no algorithm beats OPT on the worst-task problem.
"""

from __future__ import annotations

import numpy as np

#: cvxpy solves to 1e-10; OPT is a numpy evaluation at cvxpy's point, so a gap may dip this far below 0
GAP_TOLERANCE = 1e-6


def check_results(record: dict, max_slope: float = -0.4, tolerance: float = GAP_TOLERANCE, z: float = 3.0
                  ) -> list[str]:
    """Return one line per violated expectation (empty: all hold)."""
    failures = []
    for loss, entry in record["rates"].items():
        for algorithm, r in entry["algorithms"].items():
            gap, bound = np.asarray(r["gap"]), np.asarray(r["bound"])[:, None]
            where = f"{loss}/{algorithm}"
            for h, T in enumerate(entry["horizons"]):
                if np.any(gap[h] > bound[h]):
                    failures.append(f"{where}: T={T}: gap {gap[h].max():.3g} above its bound {bound[h, 0]:.3g}")
                if np.any(gap[h] < -tolerance):
                    failures.append(f"{where}: T={T}: gap {gap[h].min():.3g} < -{tolerance:g}: "
                                    "cvxpy's OPT is not optimal")
            if not r["slope"] <= max_slope:
                failures.append(f"{where}: log-log slope {r['slope']:.3f} > {max_slope} "
                                f"(fitted on T >= {entry['slope_from']})")
    for sequence, r in record["exp3"]["sequences"].items():
        for T, regret, stderr, bound in zip(r["horizons"], r["mean_regret"], r["stderr"], r["bound"]):
            if regret - z * stderr > bound:
                failures.append(f"exp3/{sequence}: T={T}: mean regret {regret:.4g} (stderr {stderr:.3g}) "
                                f"above its bound {bound:.4g} by more than {z:g} standard errors")
    wt = record["worst_task"]
    for algorithm, r in wt["algorithms"].items():
        worst = np.max(r["task_excess"], axis=1)
        if np.any(worst < wt["opt"] - tolerance):
            failures.append(f"worst_task/{algorithm}: worst-task excess {worst.min():.6g} below OPT {wt['opt']:.6g}")
    return failures
