"""AMA-R: adaptive reweighting of the task losses (spec section 3; Sagawa et al. 2019's online Group DRO).

Each step, on a task-balanced batch drawn at theta_t:
    g_i          = batch estimate of the clipped excess E_i(theta_t)
    alpha_{t+1}  = normalize(alpha_t * exp(eta_alpha g))          (optionally smoothed toward uniform)
    theta_{t+1}  = theta_t - lr * grad_theta sum_i alpha_{t+1,i} g_i     (objective = "excess")
                   theta_t - lr * grad_theta sum_i alpha_{t+1,i} L_i     (objective = "loss", DoReMi-style)
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.base import Mixer, check_k, check_reference
from amalab.mixers.excess import check_clip, task_excess
from amalab.mixers.exponentiated_gradient import ExpGradWeights
from amalab.mixers.task_batches import TaskLayout, balanced_tasks

OBJECTIVES = ("excess", "loss")


class AMAR(Mixer):
    """Exponentiated-gradient task weights on the clipped excess loss.

    ``eta_alpha`` and ``smoothing`` may be scalars or arrays of ``batch_shape`` (one value per run).
    """

    state_keys = ("eg.log_weights", "alpha_sum", "steps")

    def __init__(self, k: int, eta_alpha, *, clip: str = "example", objective: str = "excess",
                 smoothing=0.0, reference: str = "specialist", batch_shape: tuple[int, ...] = ()):
        self.k = check_k(k)
        self.clip = check_clip(clip)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        self.objective = objective
        self.reference = check_reference(reference)
        self.batch_shape = tuple(batch_shape)
        self.eg = ExpGradWeights(self.k, eta_alpha, smoothing, self.batch_shape)
        self.alpha_sum = np.zeros(self.batch_shape + (self.k,))
        self.steps = np.zeros((), dtype=np.int64)
        #: the last batch's per-task excess g (for logging)
        self.last_excess = np.zeros(self.batch_shape + (self.k,))

    @property
    def weights(self) -> np.ndarray:
        return self.eg.weights

    @property
    def average_weights(self) -> np.ndarray:
        """Running average of the alphas theta stepped with (alpha_2..alpha_{t+1}): the minimax mixture."""
        return self.alpha_sum / int(self.steps) if self.steps else self.weights

    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        return balanced_tasks(self.k, batch_size, self.batch_shape)

    def step(self, task_ids, losses, ref_losses=None):
        layout = TaskLayout(task_ids, self.k)
        if np.any(layout.counts == 0):
            missing = np.flatnonzero((layout.counts == 0).reshape(-1, self.k).any(axis=0)).tolist()
            raise ValueError(f"AMA-R needs every task in every batch; tasks {missing} have no example")
        g, active = task_excess(layout, losses, ref_losses, self.clip)
        alpha = self.eg.update(g)
        self.alpha_sum += alpha
        self.steps += 1
        self.last_excess = g
        coeffs = layout.gather(alpha / layout.counts)
        return coeffs * active if self.objective == "excess" else coeffs
