"""Specialists, the minimax optimum and the constants G, Bl of a convex problem (docs/maths.md section 5).

    theta_i = argmin_{||u|| <= R} L_i(u)                      (specialist of task i)
    s(z)    = l(theta_i; z)  for z in D_i                     (its cached per-example loss)
    OPT     = min_{||u|| <= R} max_i E_i(u)  =  min t  s.t.  E_i(u) <= t,  ||u|| <= R     (epigraph form)
    theta_std = argmin_{||u|| <= R} sum_i |D_i| L_i(u) / sum_i |D_i|       (the standard objective: DoReMi's
                                                                           baseline model, docs/maths.md (7))
    D(alpha) = min_{||u|| <= R} sum_i alpha_i E_i(u)                    (the dual function, for duality gaps)

Both are solved with cvxpy (Clarabel, tolerance 1e-10, 1e-8 at worst: far below the gaps measured).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from amalab.convex.problems import MultiTaskProblem
from amalab.mixers.excess import check_clip, task_excess, task_statistics
from amalab.mixers.task_batches import TaskLayout

#: tolerances tried in turn, each with Clarabel's default steps and then shorter ones (which get it past
#: the "insufficient progress" stalls some exponential-cone problems hit); the first certified optimum is kept
TOLERANCES = (1e-10, 1e-9, 1e-8)
STEP_FRACTIONS = (0.99, 0.95)


def _solve(problem: cp.Problem, what: str, accept_inaccurate: bool = False) -> None:
    """Solve to the first tolerance Clarabel certifies; with ``accept_inaccurate``, fall back on its
    "optimal_inaccurate" point (for values that are re-evaluated in numpy and checked elsewhere)."""
    for tol in TOLERANCES:
        for step_fraction in STEP_FRACTIONS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # cvxpy's "may be inaccurate": judged below
                try:
                    problem.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol,
                                  max_iter=500, max_step_fraction=step_fraction)
                except cp.SolverError:  # numerical trouble with these settings: try the next
                    continue
            if problem.status == cp.OPTIMAL:
                return
    if accept_inaccurate and problem.status == cp.OPTIMAL_INACCURATE:
        return
    raise RuntimeError(f"cvxpy could not solve the {what} to tolerance {TOLERANCES[-1]:g}: "
                       f"status {problem.status}")


def _task_losses(problem: MultiTaskProblem, u: cp.Variable, i: int) -> cp.Expression:
    rows = problem.slices[i]
    return problem.loss.cvx(problem.features[rows] @ u, problem.targets[rows], problem.beta)


def solve_specialists(problem: MultiTaskProblem) -> np.ndarray:
    """theta_i = argmin over the ball of task i's mean loss, for every task: ``(k, d)``."""
    thetas = np.zeros((problem.k, problem.dim))
    for i in range(problem.k):
        u = cp.Variable(problem.dim)
        _solve(cp.Problem(cp.Minimize(cp.sum(_task_losses(problem, u, i)) / problem.sizes[i]),
                          [cp.norm(u, 2) <= problem.radius]), f"specialist of task {i}")
        thetas[i] = problem.project(u.value)
    return thetas


def _cvx_task_excess(problem, u, i, s, clip):
    rows = problem.slices[i]
    losses = _task_losses(problem, u, i)
    if clip == "example":
        return cp.sum(cp.pos(losses - s[rows])) / problem.sizes[i]
    diff = cp.sum(losses) / problem.sizes[i] - s[rows].mean()
    return cp.pos(diff) if clip == "task" else diff


def full_task_excess(problem: MultiTaskProblem, spec_losses: np.ndarray, clip: str, u: np.ndarray) -> np.ndarray:
    """E_i(u) for every task on the full data, for u of shape ``(..., d)``: ``(..., k)``."""
    losses = problem.losses(u)
    layout = TaskLayout(np.broadcast_to(problem.task, losses.shape), problem.k)
    return task_excess(task_statistics(layout, losses, spec_losses), clip)


@dataclass(frozen=True, eq=False)
class SolvedProblem:
    """A problem with its specialists, minimax optimum and the constants of its bounds."""

    problem: MultiTaskProblem
    clip: str
    specialists: np.ndarray  # (k, d)
    spec_losses: np.ndarray  # (N,): s(z)
    opt_theta: np.ndarray  # (d,)
    opt_value: float  # max_i E_i(opt_theta), evaluated in numpy
    solver_opt_value: float  # cvxpy's objective value, for the record
    G: float  # max per-example gradient norm of e on the ball
    Bl: float  # max per-example e on the ball
    standard_theta: np.ndarray  # (d,): argmin over the ball of the union mean loss

    @property
    def D(self) -> float:
        """Diameter of the domain: 2R."""
        return 2.0 * self.problem.radius

    def task_excess(self, u: np.ndarray) -> np.ndarray:
        """E_i(u) for every task on the full data, for u of shape ``(..., d)``: ``(..., k)``."""
        return full_task_excess(self.problem, self.spec_losses, self.clip, u)

    def worst_excess(self, u: np.ndarray) -> np.ndarray:
        """max_i E_i(u), the minimax objective."""
        return self.task_excess(u).max(axis=-1)

    def base_losses(self) -> np.ndarray:
        """Per-example losses of the model trained on the standard objective: DoReMi's baseline (docs/maths.md section 7)."""
        return self.problem.losses(self.standard_theta)

    def duality_gap(self, theta_bar: np.ndarray, alpha_bar: np.ndarray) -> np.ndarray:
        """max_i E_i(theta_bar) - min_u sum_i alpha_bar_i E_i(u) for each row (docs/maths.md (5))."""
        theta_bar, alpha_bar = np.atleast_2d(theta_bar), np.atleast_2d(alpha_bar)
        dual = np.array([mixture_minimum(self.problem, self.spec_losses, self.clip, a) for a in alpha_bar])
        return self.worst_excess(theta_bar) - dual


def gradient_and_range_bounds(problem: MultiTaskProblem, spec_losses: np.ndarray) -> tuple[float, float]:
    """G = max_z max_{||u|| <= R} ||grad e(u; z)|| and Bl = max_z max_{||u|| <= R} e(u; z), exactly.

    e's gradient is 0 or grad l = phi_z'(m) a_z, and m = u . a_z sweeps [-R||a_z||, R||a_z||] on the ball;
    a convex phi_z and its (monotone) slope peak in absolute value at an end of that interval.
    """
    norms = np.linalg.norm(problem.features, axis=1)
    ends = np.stack([-problem.radius * norms, problem.radius * norms])
    loss, y, beta = problem.loss, problem.targets, problem.beta
    G = float(np.max(np.abs(loss.slope(ends, y, beta)).max(axis=0) * norms))
    Bl = float(np.max(loss.value(ends, y, beta).max(axis=0) - spec_losses))
    return G, max(Bl, 0.0)


def minimax_optimum(problem: MultiTaskProblem, spec_losses: np.ndarray, clip: str = "example"
                    ) -> tuple[np.ndarray, float, float]:
    """OPT = min over the ball of max_i E_i, in epigraph form; returns (u*, max_i E_i(u*), cvxpy value)."""
    check_clip(clip)
    u, t = cp.Variable(problem.dim), cp.Variable()
    constraints = [cp.norm(u, 2) <= problem.radius]
    constraints += [_cvx_task_excess(problem, u, i, spec_losses, clip) <= t for i in range(problem.k)]
    cvx_problem = cp.Problem(cp.Minimize(t), constraints)
    _solve(cvx_problem, "minimax problem")
    u_star = problem.project(u.value)
    value = full_task_excess(problem, spec_losses, clip, u_star).max()
    return u_star, float(value), float(cvx_problem.value)


def standard_solution(problem: MultiTaskProblem) -> np.ndarray:
    """argmin over the ball of the union mean loss sum_i |D_i| L_i / sum_i |D_i| (standard alignment)."""
    u = cp.Variable(problem.dim)
    losses = problem.loss.cvx(problem.features @ u, problem.targets, problem.beta)
    _solve(cp.Problem(cp.Minimize(cp.sum(losses) / len(problem.task)), [cp.norm(u, 2) <= problem.radius]),
           "standard objective")
    return problem.project(u.value)


def mixture_minimum(problem: MultiTaskProblem, spec_losses: np.ndarray, clip: str, alpha: np.ndarray) -> float:
    """min over the ball of sum_i alpha_i E_i(u), evaluated in numpy at cvxpy's minimizer.

    Evaluating at the minimizer gives an upper bound on the true minimum, so a duality gap computed from
    it can only be underestimated, never inflated. Clarabel sometimes stops at "optimal_inaccurate" on
    these problems (near-degenerate weights); its value then agrees with tighter settings to ~1e-9, far
    below the gaps measured, and the check "duality gap >= primal gap" would expose a worse point.
    """
    u = cp.Variable(problem.dim)
    objective = sum(float(a) * _cvx_task_excess(problem, u, i, spec_losses, clip)
                    for i, a in enumerate(alpha) if a > 0)
    _solve(cp.Problem(cp.Minimize(objective), [cp.norm(u, 2) <= problem.radius]), "dual function",
           accept_inaccurate=True)
    u_star = problem.project(u.value)
    return float(full_task_excess(problem, spec_losses, clip, u_star) @ np.asarray(alpha, dtype=float))


def solve(problem: MultiTaskProblem, clip: str | None = None) -> SolvedProblem:
    """Specialists, cached specialist losses, OPT, the standard solution and the constants G, Bl.

    ``clip`` defaults to the one the problem was generated with (its settings), else "example".
    """
    clip = problem.settings.get("clip", "example") if clip is None else clip
    specialists = solve_specialists(problem)
    spec_losses = np.concatenate([problem.losses(specialists[i], rows=sl) for i, sl in enumerate(problem.slices)])
    u_star, opt_value, solver_value = minimax_optimum(problem, spec_losses, clip)
    G, Bl = gradient_and_range_bounds(problem, spec_losses)
    return SolvedProblem(problem, clip, specialists, spec_losses, u_star, opt_value, solver_value, G, Bl,
                         standard_solution(problem))
