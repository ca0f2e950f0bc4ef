"""Convex per-example losses of a linear score m = u . a_z, with u = theta - theta_ref (docs/maths.md sections 1, 5).

For a log-linear policy pi_theta(y|x) ~ exp(theta . phi(x, y)) the partition function cancels in the DPO
margin, so with a_z = phi(x, y_w) - phi(x, y_l) the implicit reward margin is h = beta * u . a_z and

    dpo            l = -log sigmoid(beta m)            (logistic loss on feature differences)
    ipo            l = (m - 1 / (2 beta))^2             ((h / beta - 1 / (2 beta))^2, a least-squares loss)
    hinge          l = max(0, 1 - beta m)               (SLiC; a linear SVM loss)
    least_squares  l = (m - y)^2                        (plain regression task, a_z = x)
    logistic       l = log(1 + exp(-y m))               (plain classification task, a_z = x, y = +-1)

Every loss is a convex function phi_z(m) of the scalar m, which is what the constants G and Bl use: on the
ball ||u|| <= R, m ranges over [-R ||a_z||, R ||a_z||] and a convex phi_z and its slope peak in absolute
value at an end of that interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cvxpy as cp
import numpy as np
from scipy.special import expit

from amalab.objectives.margin import margin_loss, margin_loss_slope


@dataclass(frozen=True)
class MarginLoss:
    """A loss phi(m; y, beta), its derivative in m, and the same loss as a cvxpy expression."""

    name: str
    value: Callable[[np.ndarray, np.ndarray, float], np.ndarray]
    slope: Callable[[np.ndarray, np.ndarray, float], np.ndarray]
    cvx: Callable[[cp.Expression, np.ndarray, float], cp.Expression]
    #: whether the examples are preference pairs (a_z a feature difference) or labelled points
    preference: bool

    def __reduce__(self):
        # the functions are lambdas, which do not pickle: a loss travels to worker processes by name
        return get_loss, (self.name,)


def _preference_loss(name: str, cvx) -> MarginLoss:
    """A preference loss of m through the shared margin-to-loss map of h = beta * m (amalab.objectives.margin)."""
    return MarginLoss(
        name,
        value=lambda m, y, beta: margin_loss(name, beta * np.asarray(m, dtype=float), beta),
        slope=lambda m, y, beta: beta * margin_loss_slope(name, beta * np.asarray(m, dtype=float), beta),
        cvx=cvx,
        preference=True,
    )


LOSSES = {
    "dpo": _preference_loss("dpo", lambda m, y, beta: cp.logistic(-beta * m)),
    "ipo": _preference_loss("ipo", lambda m, y, beta: cp.square(m - 0.5 / beta)),
    "hinge": _preference_loss("hinge", lambda m, y, beta: cp.pos(1.0 - beta * m)),
    "least_squares": MarginLoss(
        "least_squares",
        value=lambda m, y, beta: (m - y) ** 2,
        slope=lambda m, y, beta: 2.0 * (m - y),
        cvx=lambda m, y, beta: cp.square(m - y),
        preference=False,
    ),
    "logistic": MarginLoss(
        "logistic",
        value=lambda m, y, beta: np.logaddexp(0.0, -y * m),
        slope=lambda m, y, beta: -y * expit(-y * m),
        cvx=lambda m, y, beta: cp.logistic(-cp.multiply(y, m)),
        preference=False,
    ),
}


def get_loss(name: str) -> MarginLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]
