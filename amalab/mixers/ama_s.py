"""AMA-S: adaptive sampling of tasks with EXP3 (docs/maths.md section 4).

Each step:
    p     = (1 - gamma) softmax(log w) + gamma / k
    draw the batch's task ids from p (one per example, or one per step), examples uniformly within a task
    theta <- theta - lr * grad_theta mean_batch e(theta; z)           (unweighted: p does the weighting)
    x_i   = (sum of e over the batch's examples of task i) / (batch size * B),  clipped into [0, 1]
    EXP3 update with xhat_i = x_i / p_i  (unbiased for E_i / B)

B is ``gain_scale``: a fixed bound (the convex lab's Bl) or ``"running"``, the largest per-task batch
excess seen so far, which keeps x in [0, 1] without knowing a bound in advance. The weights that drew the
batch also weight its gradient, so splitting a batch over micro-batches or ranks changes nothing
(docs/maths.md section 8).
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.base import (Mixer, check_baseline, check_k, per_run, require_nonnegative,
                                require_row_sums)
from amalab.mixers.excess import COUNT, active_examples, check_clip, task_excess
from amalab.mixers.exp3 import Exp3
from amalab.mixers.task_batches import TaskLayout

DRAW_PER = ("example", "step")


class AMAS(Mixer):
    """EXP3 sampling of tasks on the clipped excess loss."""

    state_keys = ("exp3.log_weights", "scale", "probs_sum", "clipped_gains", "steps")

    def __init__(self, k: int, gamma, *, gain_scale="running", eta=None, clip: str = "example",
                 draw_per: str = "example", baseline: str = "specialist",
                 batch_shape: tuple[int, ...] = ()):
        self.k = check_k(k)
        self.clip = check_clip(clip)
        if draw_per not in DRAW_PER:
            raise ValueError(f"draw_per must be one of {', '.join(DRAW_PER)}; got {draw_per!r}")
        self.draw_per = draw_per
        self.baseline = check_baseline(baseline)
        self.batch_shape = tuple(batch_shape)
        self.exp3 = Exp3(self.k, gamma, eta, self.batch_shape)
        self.running_scale = isinstance(gain_scale, str)
        if self.running_scale:
            if gain_scale != "running":
                raise ValueError(f"gain_scale must be a positive number or 'running'; got {gain_scale!r}")
            self.scale = np.zeros(self.batch_shape + (1,))
        else:
            self.scale = per_run(gain_scale, self.batch_shape, "gain_scale", 0.0, np.inf, low_open=True)
        #: how many gains fell outside [0, 1] and were clipped (a too-small fixed scale, or clip="none")
        self.clipped_gains = np.zeros((), dtype=np.int64)
        self.steps = np.zeros((), dtype=np.int64)
        self.probs_sum = np.zeros(self.batch_shape + (self.k,))

    @property
    def weights(self) -> np.ndarray:
        return self.exp3.probs()

    @property
    def average_weights(self) -> np.ndarray:
        """Running average of the sampling distributions p_1..p_t."""
        return self.probs_sum / int(self.steps) if self.steps else self.weights

    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.draw_per == "example":
            return self.exp3.draw(rng, batch_size)
        return np.repeat(self.exp3.draw(rng, 1), batch_size, axis=-1)

    def coefficients(self, task_ids, losses, baseline_losses=None, counts=None):
        layout = TaskLayout(task_ids, self.k)
        counts = layout.counts if counts is None else np.asarray(counts)
        batch_size = counts.sum(axis=-1, keepdims=True)
        return active_examples(layout, losses, baseline_losses, self.clip) / batch_size

    def update(self, stats) -> None:
        stats = self.check_stats(stats)
        counts = stats[..., COUNT, :]
        g = task_excess(stats, self.clip)
        batch_size = counts.sum(axis=-1, keepdims=True)
        if self.running_scale:
            self.scale = np.maximum(self.scale, g.max(axis=-1, keepdims=True))
        x = counts * g / (batch_size * np.where(self.scale > 0, self.scale, 1.0))
        outside = (x < 0) | (x > 1 + 1e-12)
        self.clipped_gains += int(outside.sum())
        self.probs_sum += self.exp3.probs()  # the p this batch was drawn from, before the update
        self.exp3.update(np.clip(x, 0.0, 1.0))
        self.steps += 1

    def check_state(self, state) -> None:
        self.exp3.check_state({"log_weights": state["exp3.log_weights"]})
        require_nonnegative("scale", state["scale"])
        if not self.running_scale and np.any(state["scale"] == 0):
            raise ValueError("state 'scale' is 0 for a fixed gain scale")
        require_nonnegative("clipped_gains", state["clipped_gains"])
        require_nonnegative("steps", state["steps"])
        require_row_sums("probs_sum", state["probs_sum"], state["steps"])
