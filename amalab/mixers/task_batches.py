"""How a batch is composed of tasks, and per-task reductions over a batch.

Every array here may carry leading batch dimensions (one row per independent run), so the convex lab
can run many seeds and horizons at once while the LLM trainer uses the same code with no batch dimension.
A batch is described by ``task_ids``: an integer array ``batch_shape + (batch_size,)`` naming the task of
each example slot.
"""

from __future__ import annotations

import numpy as np


def one_hot(task_ids: np.ndarray, k: int) -> np.ndarray:
    """``(..., B) -> (..., B, k)`` float indicator of each example's task."""
    return (np.asarray(task_ids)[..., None] == np.arange(k)).astype(float)


def per_task_sum(values: np.ndarray, task_ids: np.ndarray, k: int) -> np.ndarray:
    """Sum of ``values`` over the examples of each task: ``(..., B) -> (..., k)``."""
    return np.einsum("...b,...bk->...k", np.asarray(values, dtype=float), one_hot(task_ids, k))


def per_task_count(task_ids: np.ndarray, k: int) -> np.ndarray:
    """Number of examples of each task in the batch: ``(..., B) -> (..., k)``."""
    return one_hot(task_ids, k).sum(axis=-2)


def per_task_mean(values: np.ndarray, task_ids: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``values`` over each task's examples; 0 for a task with no example in the batch."""
    counts = per_task_count(task_ids, k)
    return per_task_sum(values, task_ids, k) / np.maximum(counts, 1.0)


def gather(per_task: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
    """Spread a per-task quantity back to the examples: ``(..., k), (..., B) -> (..., B)``."""
    per_task = np.asarray(per_task, dtype=float)
    task_ids = np.asarray(task_ids)
    shape = np.broadcast_shapes(per_task.shape[:-1], task_ids.shape[:-1])
    per_task = np.broadcast_to(per_task, shape + per_task.shape[-1:])
    task_ids = np.broadcast_to(task_ids, shape + task_ids.shape[-1:])
    return np.take_along_axis(per_task, task_ids, axis=-1)


def balanced_tasks(k: int, batch_size: int, batch_shape: tuple[int, ...] = ()) -> np.ndarray:
    """Task ids of a task-balanced batch: ``batch_size / k`` examples of every task (spec section 3.1)."""
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
