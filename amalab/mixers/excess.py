"""Clipped excess loss over a baseline, and the additive per-task statistics a mixer updates from.

docs/maths.md (2), (23):
    e(theta; z) = max(l(theta; z) - s(z), 0)        clip = "example"  (default)
    E_i         = max(L_i - S_i, 0)                  clip = "task"
    E_i         = L_i - S_i                          clip = "none"

where s(z) is the cached baseline loss of z: its task's specialist (AMA), the model trained on the standard
mixture (DoReMi-style) or nothing (0: raw loss, ODM-style); see ``Mixer.baseline``.

docs/maths.md (22): per task, the statistics (count, sum of e, sum of l - s) of the examples seen add across
micro-batches and ranks. They are one float64 array ``(..., 3, k)`` (rows ``COUNT``, ``EXCESS``, ``DIFF``),
so a distributed trainer combines them with one all-reduce (SUM); every E_i estimate above is a function of
them alone.
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.task_batches import TaskLayout

CLIPS = ("example", "task", "none")
#: rows of a statistics array ``(..., 3, k)``
COUNT, EXCESS, DIFF = 0, 1, 2


def check_clip(clip: str) -> str:
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}; got {clip!r}")
    return clip


def excess_loss(losses: np.ndarray, baseline_losses: np.ndarray) -> np.ndarray:
    """Per-example clipped excess ``max(l - s, 0)`` (docs/maths.md (2))."""
    return np.maximum(np.asarray(losses, dtype=float) - baseline_losses, 0.0)


def check_finite_losses(layout: TaskLayout, task_ids, losses, baseline_losses, step: int) -> None:
    """Raise, naming the step, task and slot, if a loss or a baseline loss is NaN or infinite.

    A non-finite loss would turn the mixer's weights into NaN for good; it must stop the run instead.
    """
    for what, values in (("loss", losses), ("baseline loss", baseline_losses)):
        if values is None:
            continue
        bad = ~np.isfinite(np.broadcast_to(values, layout.shape))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            value = np.broadcast_to(values, layout.shape)[where]
            task = int(np.asarray(task_ids)[where])
            raise ValueError(f"step {step}: task {task} has a non-finite {what} ({value}) "
                             f"at batch slot {where[-1]}")


def task_statistics(layout: TaskLayout, losses: np.ndarray, baseline_losses: np.ndarray | None
                    ) -> np.ndarray:
    """Per-task (count, sum of max(l - s, 0), sum of l - s) of a batch: ``(..., 3, k)``, float64, additive."""
    losses = np.asarray(losses, dtype=float)
    baseline = np.zeros_like(losses) if baseline_losses is None else np.broadcast_to(baseline_losses, losses.shape)
    return np.stack([layout.counts.astype(float), layout.sum(excess_loss(losses, baseline)),
                     layout.sum(losses - baseline)], axis=-2)


def task_excess(stats: np.ndarray, clip: str = "example") -> np.ndarray:
    """The batch estimate of E_i under ``clip`` from statistics ``(..., 3, k)``; 0 for a task with no example."""
    check_clip(clip)
    n = np.maximum(stats[..., COUNT, :], 1)
    if clip == "example":
        return stats[..., EXCESS, :] / n
    diff = stats[..., DIFF, :] / n
    return np.maximum(diff, 0.0) if clip == "task" else diff


def active_examples(layout: TaskLayout, losses: np.ndarray, baseline_losses: np.ndarray | None,
                    clip: str = "example") -> np.ndarray:
    """0/1 per example: the subgradient of the clipped excess with respect to the example's loss.

    Then ``grad_theta E_i = sum_{z in task i} active_z grad l(theta; z) / n_i`` (s is a constant; at a kink
    the subgradient 0 is taken). With ``clip = "task"`` the sign of L_i - S_i is that of the examples given
    here: exact for a whole batch, an approximation when a batch is split into micro-batches or ranks.
    """
    losses = np.asarray(losses, dtype=float)
    baseline = np.zeros_like(losses) if baseline_losses is None else np.broadcast_to(baseline_losses, losses.shape)
    if clip == "example":
        return (losses > baseline).astype(float)
    if clip == "task":
        return layout.gather((layout.mean(losses - baseline) > 0).astype(float))
    return np.ones_like(losses)
