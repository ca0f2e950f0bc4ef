"""Fixed task mixtures: the standard-alignment baselines of docs/maths.md (17a)-(17b).

``FixedMixture(w)`` trains theta on sum_i w_i L_i, the raw loss. With ``sampling=False`` every batch is
task-balanced and task i's examples are weighted w_i / n_i; with ``sampling=True`` the task of every
example is drawn from w and the batch mean is taken. Standard alignment (DPO on the union of the data) is
``sampling=True`` with w_i proportional to |D_i|; on a full batch it is exactly the union mean.
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.base import Mixer, check_k, require_nonnegative
from amalab.mixers.task_batches import TaskLayout, balanced_tasks, sample_tasks


class FixedMixture(Mixer):
    """A fixed mixture of the task losses; its state is the step count alone."""

    state_keys = ("steps",)

    def __init__(self, weights, *, sampling: bool = False, batch_shape: tuple[int, ...] = ()):
        w = np.asarray(weights, dtype=float)
        if w.ndim != 1:
            raise ValueError(f"mixture weights must be a list of k numbers, got shape {w.shape}")
        self.k = check_k(len(w))
        if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0; got {w.tolist()}")
        self.mixture = w / w.sum()
        self.sampling = bool(sampling)
        self.baseline = "none"
        self.batch_shape = tuple(batch_shape)
        self.steps = np.zeros((), dtype=np.int64)

    @property
    def weights(self) -> np.ndarray:
        return np.broadcast_to(self.mixture, self.batch_shape + (self.k,))

    @property
    def average_weights(self) -> np.ndarray:
        return self.weights

    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        if self.sampling:
            return sample_tasks(rng, self.weights, batch_size)
        return balanced_tasks(self.k, batch_size, self.batch_shape)

    def coefficients(self, task_ids, losses, baseline_losses=None, counts=None):
        layout = TaskLayout(task_ids, self.k)
        counts = layout.counts if counts is None else np.asarray(counts)
        if self.sampling:
            return np.broadcast_to(1.0 / counts.sum(axis=-1, keepdims=True), layout.shape).copy()
        return layout.gather(self.mixture / np.maximum(counts, 1))

    def update(self, stats) -> None:
        self.check_stats(stats)
        self.steps += 1

    def check_state(self, state) -> None:
        require_nonnegative("steps", state["steps"])
