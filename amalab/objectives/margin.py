"""The preference losses that are functions of the margin alone, one definition for numpy and torch.

With the implicit reward margin (docs/maths.md (28); docs/maths.md section 10 for the losses)
    h = beta * ( [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)] ),
these per-example losses depend on h alone (TRL's ``DPOTrainer`` names; eps = label_smoothing,
tau = discopop_tau):

    sigmoid   l = -log sigmoid(h) = softplus(-h)                                 (29; ``dpo`` is an alias)
    hinge     l = max(0, 1 - h)                                                  (31)
    ipo       l = (h / beta - 1 / (2 beta))^2                                    (30)
    exo_pair  l = q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps),  q = sigmoid(h)          (36)
    robust    l = (-(1 - eps) log sigmoid(h) + eps log sigmoid(-h)) / (1 - 2 eps)
                = softplus(-h) - eps h / (1 - 2 eps)                             (37)
    discopop  l = softplus(-h) sigmoid(-h / tau) + exp(-h) sigmoid(h / tau)      (38)

The convex lab's linear score m = (theta - theta_ref) . a_z has h = beta * m, and the LLM module computes h
from sequence log-probs (:mod:`amalab.objectives.preference`); both call these. A function returns the type it is given
(numpy in, numpy out; torch in, torch out, differentiable). This module imports no torch: a tensor is
recognised only when torch is already imported by the caller.

:data:`MARGIN_LOSSES` is the one registry of these names, with each loss's slope d l / d h ((33) and section
10.1; the convex lab's constants G use it; torch has autograd) and whether it is convex in h (sigmoid,
hinge, ipo, robust are; exo_pair and discopop are not: their slopes are not monotone, so the convex lab's
bounds do not hold for them).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np


def _torch_of(h):
    """The torch module if ``h`` is a tensor, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(h, torch.Tensor):
        return torch
    return None


def _softplus(x):
    """log(1 + exp(x)) without overflow for any x (torch: exact, no linear threshold)."""
    torch = _torch_of(x)
    if torch is not None:
        return -torch.nn.functional.logsigmoid(-x)
    return np.logaddexp(0.0, np.asarray(x, dtype=float))


def _sigmoid(x):
    torch = _torch_of(x)
    if torch is not None:
        return torch.sigmoid(x)
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=float)))


def _exp(x):
    torch = _torch_of(x)
    return torch.exp(x) if torch is not None else np.exp(x)


def _as_float(h):
    return h if _torch_of(h) is not None else np.asarray(h, dtype=float)


def dpo_margin_loss(h):
    """-log sigmoid(h), computed as softplus(-h) without overflow for any h (docs/maths.md (29))."""
    return _softplus(-_as_float(h))


def hinge_margin_loss(h):
    """max(0, 1 - h) (docs/maths.md (31))."""
    torch = _torch_of(h)
    if torch is not None:
        return torch.clamp(1.0 - h, min=0.0)
    return np.maximum(0.0, 1.0 - np.asarray(h, dtype=float))


def ipo_margin_loss(h, beta: float):
    """(h / beta - 1 / (2 beta))^2: the log-ratio difference's squared distance from 1 / (2 beta)
    (docs/maths.md (30))."""
    return (_as_float(h) / beta - 0.5 / beta) ** 2


def exo_pair_margin_loss(h, label_smoothing: float):
    """KL(q || (1 - eps, eps)) of q = (sigmoid(h), sigmoid(-h)) (docs/maths.md (36)); eps in (0, 1)."""
    h, eps = _as_float(h), label_smoothing
    q_w, q_l = _sigmoid(h), _sigmoid(-h)
    return q_w * (-_softplus(-h) - math.log1p(-eps)) + q_l * (-_softplus(h) - math.log(eps))


def robust_margin_loss(h, label_smoothing: float):
    """The unbiased loss under label flips of probability eps in [0, 1/2) (docs/maths.md (37)): DPO plus a
    linear term."""
    h = _as_float(h)
    return _softplus(-h) - label_smoothing / (1.0 - 2.0 * label_smoothing) * h


def discopop_margin_loss(h, discopop_tau: float):
    """The logistic and exponential losses blended by sigmoid(h / tau) (docs/maths.md (38)).

    exp(-h) sigmoid(h / tau) is taken as exp(-h - softplus(-h / tau)), finite where exp(-h) alone overflows.
    """
    h = _as_float(h)
    return _softplus(-h) * _sigmoid(-h / discopop_tau) + _exp(-h - _softplus(-h / discopop_tau))


def _exo_pair_slope(h, beta, label_smoothing, discopop_tau):
    # dl/dq = log(q / (1 - q)) - log((1 - eps) / eps) = h - log((1 - eps) / eps), dq/dh = q (1 - q)
    eps = label_smoothing
    return _sigmoid(h) * _sigmoid(-h) * (h - (math.log1p(-eps) - math.log(eps)))


def _discopop_slope(h, beta, label_smoothing, discopop_tau):
    tau, blend = discopop_tau, _sigmoid(-h / discopop_tau)
    exponential = np.exp(-h - _softplus(-h / tau))  # exp(-h) sigmoid(h / tau)
    return (-_sigmoid(-h) * blend - _softplus(-h) * blend * _sigmoid(h / tau) / tau
            - exponential * (1.0 - blend / tau))


@dataclass(frozen=True)
class MarginLossSpec:
    """A margin-only loss: value l(h) and slope dl/dh, each of (h, beta, label_smoothing, discopop_tau)."""

    value: Callable
    slope: Callable
    convex: bool


_SIGMOID = MarginLossSpec(
    value=lambda h, beta, eps, tau: dpo_margin_loss(h),
    slope=lambda h, beta, eps, tau: -np.exp(-np.logaddexp(0.0, h)),  # -sigmoid(-h), without overflow
    convex=True,
)

#: every margin-only loss by name (``dpo`` is TRL's ``sigmoid``)
MARGIN_LOSSES = {
    "sigmoid": _SIGMOID,
    "dpo": _SIGMOID,
    "hinge": MarginLossSpec(
        value=lambda h, beta, eps, tau: hinge_margin_loss(h),
        slope=lambda h, beta, eps, tau: np.where(h < 1.0, -1.0, 0.0),  # the right derivative at the kink
        convex=True,
    ),
    "ipo": MarginLossSpec(
        value=lambda h, beta, eps, tau: ipo_margin_loss(h, beta),
        slope=lambda h, beta, eps, tau: 2.0 * (h / beta - 0.5 / beta) / beta,
        convex=True,
    ),
    "exo_pair": MarginLossSpec(
        value=lambda h, beta, eps, tau: exo_pair_margin_loss(h, eps), slope=_exo_pair_slope, convex=False
    ),
    "robust": MarginLossSpec(
        value=lambda h, beta, eps, tau: robust_margin_loss(h, eps),
        slope=lambda h, beta, eps, tau: -np.exp(-np.logaddexp(0.0, h)) - eps / (1.0 - 2.0 * eps),
        convex=True,
    ),
    "discopop": MarginLossSpec(
        value=lambda h, beta, eps, tau: discopop_margin_loss(h, tau), slope=_discopop_slope, convex=False
    ),
}
MARGIN_LOSS_NAMES = tuple(MARGIN_LOSSES)


def check_margin_options(name: str, label_smoothing: float = 0.0, discopop_tau: float = 0.05) -> None:
    """ValueError naming the option if ``name`` cannot use these options (TRL's ranges)."""
    if name == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: exo_pair needs 0 < label_smoothing < 1 (its eps; the EXO paper "
                         f"suggests 1e-3), got {label_smoothing!r}")
    if name == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: robust needs 0 <= label_smoothing < 0.5 (a flip probability), "
                         f"got {label_smoothing!r}")
    if name == "discopop" and not discopop_tau > 0.0:
        raise ValueError(f"discopop_tau: must be > 0, got {discopop_tau!r}")


def _spec(name: str) -> MarginLossSpec:
    if name not in MARGIN_LOSSES:
        raise ValueError(f"unknown margin loss {name!r}; known: {', '.join(MARGIN_LOSS_NAMES)}")
    return MARGIN_LOSSES[name]


def margin_loss(name: str, h, beta: float, *, label_smoothing: float = 0.0, discopop_tau: float = 0.05):
    """The loss ``name`` of margins h (module docstring); beta is used by ipo only."""
    spec = _spec(name)
    check_margin_options(name, label_smoothing, discopop_tau)
    return spec.value(h, beta, label_smoothing, discopop_tau)


def margin_loss_slope(name: str, h, beta: float, *, label_smoothing: float = 0.0, discopop_tau: float = 0.05):
    """d loss / d h for numpy arrays.

    The convex lab's slope in m is beta * margin_loss_slope(name, beta * m, beta). The hinge's slope at its
    kink h = 1 is taken as 0 (the right derivative).
    """
    spec = _spec(name)
    check_margin_options(name, label_smoothing, discopop_tau)
    return spec.slope(np.asarray(h, dtype=float), beta, label_smoothing, discopop_tau)
