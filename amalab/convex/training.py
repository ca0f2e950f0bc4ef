"""Projected training of a linear model on a convex multi-task problem with any mixer.

One loop (nanoGPT-style) runs R independent runs at once: row r has its own horizon, step size and
mixer hyperparameters, and all rows share the problem. A row's result is its averaged iterate
theta_bar = mean_{t < T_r} theta_t over the points at which gradients were taken; rows whose horizon has
passed keep stepping (harmlessly) so the batch stays rectangular.

The steps run on one of two engines with the same random numbers: ``"numpy"``, the reference, which calls
the mixers of :mod:`amalab.mixers` step by step, and ``"compiled"`` (the default), the numba kernel of
:mod:`amalab.convex.compiled_steps` (run by :mod:`amalab.convex.compiled_engine`), which does the same
arithmetic without Python per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amalab.convex.compiled_engine import compiled_advance, compiled_kind
from amalab.convex.optimum import SolvedProblem
from amalab.convex.problems import MultiTaskProblem
from amalab.mixers import AMAS, Mixer

ENGINES = ("compiled", "numpy")
#: progress is reported (and the compiled kernel returns to Python) at least this often, in steps
PROGRESS_EVERY = 1024


@dataclass
class TrainingResult:
    theta_bar: np.ndarray  # (R, d): averaged iterate of each row at its horizon
    task_excess: np.ndarray  # (R, k): E_i(theta_bar)
    worst_excess: np.ndarray  # (R,): max_i E_i(theta_bar)
    average_weights: np.ndarray  # (R, k): task weights (alpha or p) averaged over the row's steps
    curve_steps: np.ndarray  # (C,): steps at which the curve was taken
    curve: np.ndarray  # (R, C): max_i E_i of the averaged iterate at each checkpoint


@dataclass
class TrainingState:
    """What the steps change: the iterates u = theta - theta_ref, their running sum, and the mixer."""

    problem: MultiTaskProblem
    mixer: Mixer
    refs: np.ndarray | None  # (N,): the cached baseline losses the mixer names, or None
    lr: np.ndarray  # (R, 1)
    batch_size: int | None
    rng: np.random.Generator
    u: np.ndarray  # (R, d)
    u_sum: np.ndarray  # (R, d)
    done: int = 0


def baseline_losses(solved: SolvedProblem, mixer: Mixer) -> np.ndarray | None:
    """The cached per-example losses that ``mixer.baseline`` names."""
    if mixer.baseline == "specialist":
        return solved.spec_losses
    if mixer.baseline == "standard":
        return solved.base_losses()
    return None


def numpy_advance(state: TrainingState, n_steps: int) -> None:
    """``n_steps`` projected steps theta <- Proj(theta - lr * sum_j c_j grad l_j), the mixers called as they
    are (the reference the compiled kernel is tested against)."""
    problem, mixer, refs, batch_size, rng = state.problem, state.mixer, state.refs, state.batch_size, state.rng
    n_rows = state.u.shape[0]
    offsets, sizes = problem.offsets, problem.sizes
    for _ in range(n_steps):
        u = state.u
        if batch_size is None:
            task_ids = np.broadcast_to(problem.task, (n_rows, len(problem.task)))
            features, targets = problem.features, problem.targets
            margins = u @ features.T
            batch_refs = refs
        else:
            task_ids = mixer.draw(rng, batch_size)
            rows = offsets[task_ids] + (rng.random(task_ids.shape) * sizes[task_ids]).astype(np.int64)
            features, targets = problem.features[rows], problem.targets[rows]
            margins = np.einsum("rd,rbd->rb", u, features)
            batch_refs = None if refs is None else refs[rows]
        losses = problem.loss.value(margins, targets, problem.beta)
        slopes = problem.loss.slope(margins, targets, problem.beta)
        coeffs = mixer.step(task_ids, losses, batch_refs)
        if batch_size is None:
            grad = (coeffs * slopes) @ features
        else:
            grad = np.einsum("rb,rbd->rd", coeffs * slopes, features)
        state.u_sum += u
        state.u = problem.project(u - state.lr * grad)
        state.done += 1


def train(solved: SolvedProblem, mixer: Mixer, horizons, lr, rng: np.random.Generator,
          batch_size: int | None = None, curve_steps=(), progress=None, engine: str = "compiled"
          ) -> TrainingResult:
    """Run ``mixer`` with projected steps theta <- Proj(theta - lr * sum_j c_j grad l_j).

    ``horizons`` and ``lr`` hold one value per row (``mixer.batch_shape == (R,)``); ``batch_size=None``
    uses the full data every step (deterministic AMA-R, or the exact union for ``standard``).
    ``progress`` is called with the number of steps done, every 1024 steps and at the end. ``engine``
    "numpy" runs the reference loop; "compiled" runs the numba kernel (numpy for a mixer it does not run).
    """
    problem = solved.problem
    horizons = np.asarray(horizons, dtype=np.int64)
    (n_rows,) = horizons.shape
    if mixer.batch_shape != (n_rows,):
        raise ValueError(f"mixer runs {mixer.batch_shape} rows but {n_rows} horizons were given")
    if batch_size is None and isinstance(mixer, AMAS):
        raise ValueError("AMA-S samples its tasks: give it a batch_size")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if batch_size is not None:
        mixer.draw(np.random.default_rng(0), batch_size)  # the mixer's own check (a generator of its own:
        # the run's random numbers are the same whichever engine runs the steps)
    lr = np.broadcast_to(np.asarray(lr, dtype=float), (n_rows,))[:, None]
    t_max = int(horizons.max())
    curve_steps = np.array(sorted({int(c) for c in curve_steps if 0 < c <= t_max}), dtype=np.int64)
    state = TrainingState(problem, mixer, baseline_losses(solved, mixer), lr, batch_size, rng,
                          np.zeros((n_rows, problem.dim)), np.zeros((n_rows, problem.dim)))
    advance = compiled_advance if engine == "compiled" and compiled_kind(mixer) is not None else numpy_advance

    theta_bar = np.zeros_like(state.u)
    weights_at_horizon = np.zeros((n_rows, problem.k))
    curve = np.zeros((n_rows, len(curve_steps)))
    stops = sorted({*horizons.tolist(), *curve_steps.tolist(), *range(PROGRESS_EVERY, t_max, PROGRESS_EVERY), t_max})
    for stop in stops:
        advance(state, stop - state.done)
        finished = np.flatnonzero(horizons == stop)
        theta_bar[finished] = state.u_sum[finished] / stop
        weights_at_horizon[finished] = mixer.average_weights[finished]
        if stop in curve_steps:
            curve[:, int(np.searchsorted(curve_steps, stop))] = solved.worst_excess(state.u_sum / stop)
        if progress is not None and (stop % PROGRESS_EVERY == 0 or stop == t_max):
            progress(stop)

    task_excess = solved.task_excess(theta_bar)
    return TrainingResult(theta_bar, task_excess, task_excess.max(axis=-1), weights_at_horizon,
                          curve_steps, curve)
