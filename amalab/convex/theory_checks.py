"""What the rate reproduction must show (spec section 5), checked on a results record.

  - every measured gap is under its theoretical bound;
  - no gap is below -tolerance (which would mean cvxpy's OPT is not optimal);
  - the fitted slope of log(median gap) against log(T) is <= ``max_slope`` (theory: -1/2);
  - EXP3's mean regret is under (e - 1) gamma G_max + k ln k / gamma;
  - no algorithm beats OPT on the worst-task problem.
"""

from __future__ import annotations

import numpy as np

#: cvxpy solves to 1e-10; OPT is a numpy evaluation at cvxpy's point, so a gap may dip this far below 0
GAP_TOLERANCE = 1e-6


def check_results(record: dict, max_slope: float = -0.4, tolerance: float = GAP_TOLERANCE) -> list[str]:
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
                failures.append(f"{where}: log-log slope {r['slope']:.3f} > {max_slope}")
    for sequence, r in record["exp3"]["sequences"].items():
        for T, regret, bound in zip(r["horizons"], r["mean_regret"], r["bound"]):
            if regret > bound:
                failures.append(f"exp3/{sequence}: T={T}: mean regret {regret:.4g} above its bound {bound:.4g}")
    wt = record["worst_task"]
    for algorithm, r in wt["algorithms"].items():
        worst = np.max(r["task_excess"], axis=1)
        if np.any(worst < wt["opt"] - tolerance):
            failures.append(f"worst_task/{algorithm}: worst-task excess {worst.min():.6g} below OPT {wt['opt']:.6g}")
    return failures
