"""Margin-to-loss maps of the preference losses, one definition for numpy arrays and torch tensors.

With the implicit reward margin of docs/maths.md (28),
    h = beta * ( [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)] ),
the per-example losses are functions of h alone:

    dpo    l = -log sigmoid(h) = softplus(-h)       (Rafailov et al. 2023)
    ipo    l = (h / beta - 1 / (2 beta))^2           (Azar et al. 2023)
    hinge  l = max(0, 1 - h)                         (SLiC)

The convex lab's linear score m = (theta - theta_ref) . a_z has h = beta * m, and the LLM module computes h
from sequence log-probs; both call these. A function returns the type it is given (numpy in, numpy out;
torch in, torch out, differentiable). This module imports no torch: a tensor is recognised only when torch
is already imported by the caller.
"""

from __future__ import annotations

import sys

import numpy as np

MARGIN_LOSS_NAMES = ("dpo", "ipo", "hinge")


def _torch_of(h):
    """The torch module if ``h`` is a tensor, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(h, torch.Tensor):
        return torch
    return None


def dpo_margin_loss(h):
    """-log sigmoid(h), computed as softplus(-h) without overflow for any h."""
    torch = _torch_of(h)
    if torch is not None:
        return -torch.nn.functional.logsigmoid(h)
    return np.logaddexp(0.0, -np.asarray(h, dtype=float))


def ipo_margin_loss(h, beta: float):
    """(h / beta - 1 / (2 beta))^2: the squared distance of the log-ratio difference from 1 / (2 beta)."""
    return (h / beta - 0.5 / beta) ** 2


def hinge_margin_loss(h):
    """max(0, 1 - h)."""
    torch = _torch_of(h)
    if torch is not None:
        return torch.clamp(1.0 - h, min=0.0)
    return np.maximum(0.0, 1.0 - np.asarray(h, dtype=float))


def margin_loss(name: str, h, beta: float):
    """The loss ``name`` (dpo, ipo, hinge) of margins h; beta is used by ipo only."""
    if name == "dpo":
        return dpo_margin_loss(h)
    if name == "ipo":
        return ipo_margin_loss(h, beta)
    if name == "hinge":
        return hinge_margin_loss(h)
    raise ValueError(f"unknown margin loss {name!r}; known: {', '.join(MARGIN_LOSS_NAMES)}")


def margin_loss_slope(name: str, h, beta: float):
    """d loss / d h for numpy arrays (the convex lab's constants G use it; torch has autograd).

    The convex lab's slope in m is beta * margin_loss_slope(name, beta * m, beta). The hinge's slope at its
    kink h = 1 is taken as 0 (the right derivative).
    """
    h = np.asarray(h, dtype=float)
    if name == "dpo":
        return -np.exp(-np.logaddexp(0.0, h))  # -sigmoid(-h), without overflow or cancellation
    if name == "ipo":
        return 2.0 * (h / beta - 0.5 / beta) / beta
    if name == "hinge":
        return np.where(h < 1.0, -1.0, 0.0)
    raise ValueError(f"unknown margin loss {name!r}; known: {', '.join(MARGIN_LOSS_NAMES)}")
