"""Clipped excess loss over a reference (spec section 2).

    e(theta; z) = max(l(theta; z) - s(z), 0)        clip = "example"  (default)
    E_i         = max(L_i - S_i, 0)                  clip = "task"
    E_i         = L_i - S_i                          clip = "none"

where s(z) is the cached loss of task i's specialist on z (or of pi_ref, or 0: see ``Mixer.reference``).
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.task_batches import TaskLayout

CLIPS = ("example", "task", "none")


def check_clip(clip: str) -> str:
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}; got {clip!r}")
    return clip


def excess_loss(losses: np.ndarray, ref_losses: np.ndarray) -> np.ndarray:
    """Per-example clipped excess ``max(l - s, 0)`` (spec section 2)."""
    return np.maximum(np.asarray(losses, dtype=float) - ref_losses, 0.0)


def task_excess(
    layout: TaskLayout, losses: np.ndarray, ref_losses: np.ndarray | None, clip: str = "example"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-task excess of a batch and the examples through which it has a gradient.

    ``layout`` says which task each example belongs to. Returns ``(g, active)``:
      - ``g`` (``(..., k)``): the batch estimate of E_i under ``clip`` (0 for a task absent from the batch);
      - ``active`` (``(..., B)``, 0/1): the subgradient of the clipped excess with respect to each
        example's loss, so that ``grad_theta g_i = sum_{z in task i} active_z grad l(theta; z) / n_i``
        (s is a constant; at a kink we take the subgradient 0).
    """
    check_clip(clip)
    losses = np.asarray(losses, dtype=float)
    refs = np.zeros_like(losses) if ref_losses is None else np.broadcast_to(ref_losses, losses.shape)
    if clip == "example":
        return layout.mean(excess_loss(losses, refs)), (losses > refs).astype(float)
    diff = layout.mean(losses - refs)
    if clip == "task":
        return np.maximum(diff, 0.0), layout.gather((diff > 0).astype(float))
    return diff, np.ones_like(losses)
