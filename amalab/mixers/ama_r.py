"""AMA-R: adaptive task-loss weights (docs/maths.md section 3; Sagawa et al. 2019's online Group DRO).

Each step, on a task-balanced batch drawn at theta_t, with g_t the batch estimate of the clipped excess
E_i(theta_t) (:func:`amalab.mixers.excess.task_excess`):

    alpha_{t+1}  = normalize(alpha_t * exp(eta_alpha g_t))        (optionally smoothed toward uniform)

and theta steps on sum_i a_i g_i (objective = "excess") or sum_i a_i L_i (objective = "loss",
DoReMi-style) with

    a = alpha_{t+1}   sequential play (default; Group DRO's order)
    a = alpha_t       simultaneous play (``simultaneous=True``, docs/maths.md (4c)): the weights in force when
                      the batch was drawn, so gradients can be accumulated over micro-batches and ranks
                      before the one update of alpha from the global statistics.
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.base import (Mixer, check_baseline, check_k, require_log_simplex, require_nonnegative,
                                require_row_sums)
from amalab.mixers.excess import COUNT, active_examples, check_clip, task_excess
from amalab.mixers.exponentiated_gradient import ExpGradWeights
from amalab.mixers.task_batches import TaskLayout, balanced_tasks

OBJECTIVES = ("excess", "loss")


class AMAR(Mixer):
    """Exponentiated-gradient task weights on the clipped excess loss.

    ``eta_alpha`` and ``smoothing`` may be scalars or arrays of ``batch_shape`` (one value per run).
    """

    state_keys = ("eg.log_weights", "alpha_sum", "steps")

    def __init__(self, k: int, eta_alpha, *, clip: str = "example", objective: str = "excess",
                 smoothing=0.0, baseline: str = "specialist", simultaneous: bool = False,
                 batch_shape: tuple[int, ...] = ()):
        self.k = check_k(k)
        self.clip = check_clip(clip)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        self.objective = objective
        self.baseline = check_baseline(baseline)
        if not isinstance(simultaneous, (bool, np.bool_)):
            raise ValueError(f"simultaneous must be true or false, got {simultaneous!r}")
        self.simultaneous = bool(simultaneous)
        self.update_first = not self.simultaneous
        self.batch_shape = tuple(batch_shape)
        self.eg = ExpGradWeights(self.k, eta_alpha, smoothing, self.batch_shape)
        self.alpha_sum = np.zeros(self.batch_shape + (self.k,))
        self.steps = np.zeros((), dtype=np.int64)

    @property
    def weights(self) -> np.ndarray:
        return self.eg.weights

    @property
    def average_weights(self) -> np.ndarray:
        """Running average of the alphas theta stepped with: the minimax mixture."""
        return self.alpha_sum / int(self.steps) if self.steps else self.weights

    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        return balanced_tasks(self.k, batch_size, self.batch_shape)

    def coefficients(self, task_ids, losses, baseline_losses=None, counts=None):
        layout = TaskLayout(task_ids, self.k)
        counts = layout.counts if counts is None else np.asarray(counts)
        coeffs = layout.gather(self.weights / np.maximum(counts, 1))
        if self.objective == "loss":
            return coeffs
        return coeffs * active_examples(layout, losses, baseline_losses, self.clip)

    def update(self, stats) -> None:
        stats = self.check_stats(stats)
        counts = stats[..., COUNT, :]
        if np.any(counts == 0):
            missing = np.flatnonzero((counts == 0).reshape(-1, self.k).any(axis=0)).tolist()
            raise ValueError(f"AMA-R needs every task in every batch; tasks {missing} have no example")
        g = task_excess(stats, self.clip)
        if self.simultaneous:
            self.alpha_sum += self.weights  # alpha_t: the weights this batch's theta step used
        alpha = self.eg.update(g)
        if not self.simultaneous:
            self.alpha_sum += alpha  # alpha_{t+1}: the weights theta steps with in sequential play
        self.steps += 1

    def check_state(self, state) -> None:
        require_log_simplex("eg.log_weights", state["eg.log_weights"])
        require_nonnegative("steps", state["steps"])
        require_row_sums("alpha_sum", state["alpha_sum"], state["steps"])
