"""Projected training of a linear model on a convex multi-task problem with any mixer.

One loop (nanoGPT-style) runs R independent runs at once: row r has its own horizon, step size and
mixer hyperparameters, and all rows share the problem. A row's result is its averaged iterate
theta_bar = mean_{t < T_r} theta_t over the points at which gradients were taken; rows whose horizon has
passed keep stepping (harmlessly) so the batch stays rectangular.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amalab.convex.optimum import SolvedProblem
from amalab.mixers import AMAS, Mixer


@dataclass
class TrainingResult:
    theta_bar: np.ndarray  # (R, d): averaged iterate of each row at its horizon
    task_excess: np.ndarray  # (R, k): E_i(theta_bar)
    worst_excess: np.ndarray  # (R,): max_i E_i(theta_bar)
    average_weights: np.ndarray  # (R, k): task weights (alpha or p) averaged over the row's steps
    checkpoints: np.ndarray  # (C,): steps at which the curve was taken
    curve: np.ndarray  # (R, C): max_i E_i of the averaged iterate at each checkpoint


def baseline_losses(solved: SolvedProblem, mixer: Mixer) -> np.ndarray | None:
    """The cached per-example losses that ``mixer.baseline`` names."""
    if mixer.baseline == "specialist":
        return solved.spec_losses
    if mixer.baseline == "standard":
        return solved.base_losses()
    return None


def train(solved: SolvedProblem, mixer: Mixer, horizons, lr, rng: np.random.Generator,
          batch_size: int | None = None, checkpoints=(), progress=None) -> TrainingResult:
    """Run ``mixer`` with projected steps theta <- Proj(theta - lr * sum_j c_j grad l_j).

    ``horizons`` and ``lr`` hold one value per row (``mixer.batch_shape == (R,)``); ``batch_size=None``
    uses the full data every step (deterministic AMA-R, or the exact union for ``standard``).
    ``progress`` is called with the number of steps done, every 1024 steps and at the end.
    """
    problem = solved.problem
    horizons = np.asarray(horizons, dtype=np.int64)
    (n_rows,) = horizons.shape
    if mixer.batch_shape != (n_rows,):
        raise ValueError(f"mixer runs {mixer.batch_shape} rows but {n_rows} horizons were given")
    if batch_size is None and isinstance(mixer, AMAS):
        raise ValueError("AMA-S samples its tasks: give it a batch_size")
    lr = np.broadcast_to(np.asarray(lr, dtype=float), (n_rows,))[:, None]
    refs = baseline_losses(solved, mixer)
    t_max = int(horizons.max())
    checkpoints = np.array(sorted({int(c) for c in checkpoints if 0 < c <= t_max}), dtype=np.int64)

    u = np.zeros((n_rows, problem.dim))
    u_sum = np.zeros_like(u)
    theta_bar = np.zeros_like(u)
    weights_at_horizon = np.zeros((n_rows, problem.k))
    curve = np.zeros((n_rows, len(checkpoints)))
    ends = {int(T): np.flatnonzero(horizons == T) for T in np.unique(horizons)}
    next_checkpoint = 0
    offsets, sizes = problem.offsets, problem.sizes

    for t in range(t_max):
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
        u_sum += u
        u = problem.project(u - lr * grad)

        done = t + 1
        if done in ends:
            finished = ends[done]
            theta_bar[finished] = u_sum[finished] / done
            weights_at_horizon[finished] = mixer.average_weights[finished]
        if next_checkpoint < len(checkpoints) and checkpoints[next_checkpoint] == done:
            curve[:, next_checkpoint] = solved.worst_excess(u_sum / done)
            next_checkpoint += 1
        if progress is not None and (done % 1024 == 0 or done == t_max):
            progress(done)

    task_excess = solved.task_excess(theta_bar)
    return TrainingResult(theta_bar, task_excess, task_excess.max(axis=-1), weights_at_horizon,
                          checkpoints, curve)
