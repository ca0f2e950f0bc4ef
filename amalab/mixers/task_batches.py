"""How a batch is composed of tasks, and per-task reductions over a batch.

Every array here may carry leading batch dimensions (one row per independent run), so the convex lab
can run many seeds and horizons at once while the LLM trainer uses the same code with no batch dimension.
A batch is described by ``task_ids``: an integer array ``batch_shape + (batch_size,)`` naming the task of
each example slot.
"""

from __future__ import annotations

import numpy as np


class TaskLayout:
    """Which task each example of a (possibly batched) batch belongs to, as one flat (row, task) index.

    Built once per step, it makes per-task sums and the spreading of per-task values back onto the
    examples single ``bincount`` / take calls, far cheaper than one-hot products on small batches.
    """

    def __init__(self, task_ids: np.ndarray, k: int):
        task_ids = np.asarray(task_ids)
        if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= k):
            raise ValueError(f"task ids must lie in 0..{k - 1}, got values from {task_ids.min()} to {task_ids.max()}")
        self.k = k
        self.shape = task_ids.shape
        self.n_rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        self.flat = (np.arange(self.n_rows).reshape(self.shape[:-1] + (1,)) * k + task_ids).ravel()
        #: examples of each task in the batch, ``(..., k)``
        self.counts = np.bincount(self.flat, minlength=self.n_rows * k).reshape(self.shape[:-1] + (k,))

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of per-example ``values`` over each task: ``(..., B) -> (..., k)``."""
        values = np.broadcast_to(np.asarray(values, dtype=float), self.shape).ravel()
        sums = np.bincount(self.flat, weights=values, minlength=self.n_rows * self.k)
        return sums.reshape(self.shape[:-1] + (self.k,))

    def mean(self, values: np.ndarray) -> np.ndarray:
        """Mean of ``values`` over each task's examples; 0 for a task absent from the batch."""
        return self.sum(values) / np.maximum(self.counts, 1)

    def gather(self, per_task: np.ndarray) -> np.ndarray:
        """Spread a per-task quantity back onto the examples: ``(..., k) -> (..., B)``."""
        per_task = np.broadcast_to(per_task, self.shape[:-1] + (self.k,)).ravel()
        return per_task[self.flat].reshape(self.shape)


def balanced_tasks(k: int, batch_size: int, batch_shape: tuple[int, ...] = ()) -> np.ndarray:
    """Task ids of a balanced batch: ``batch_size / k`` examples of every task (docs/maths.md section 3)."""
    if batch_size < k or batch_size % k:
        raise ValueError(
            f"a task-balanced batch needs batch_size to be a positive multiple of the number of tasks "
            f"k={k}, got batch_size={batch_size}"
        )
    ids = np.repeat(np.arange(k), batch_size // k)
    return np.broadcast_to(ids, tuple(batch_shape) + ids.shape).copy()


def sample_tasks(rng: np.random.Generator, probs: np.ndarray, size: int) -> np.ndarray:
    """Draw ``size`` task ids per row from the categorical distributions ``probs`` (``(..., k)``).

    Inverse-CDF sampling, vectorized over rows that each have their own distribution.
    """
    probs = np.asarray(probs, dtype=float)
    cdf = np.cumsum(probs, axis=-1)
    cdf[..., -1] = np.inf  # rounding must never push a draw past the last task
    u = rng.random(probs.shape[:-1] + (size,))
    return (u[..., :, None] >= cdf[..., None, :]).sum(axis=-1)
