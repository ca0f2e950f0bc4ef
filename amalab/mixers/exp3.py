"""EXP3 (Auer, Cesa-Bianchi, Freund and Schapire 2002), in log space (docs/maths.md (5a), (5c)).

    p_t        = (1 - gamma) softmax(log w_t) + gamma / k
    xhat_{t,i} = x_{t,i} / p_{t,i}        (x_{t,i} = 0 for arms not drawn; E[xhat_{t,i}] = x_{t,i})
    log w_{t+1} = log w_t + eta xhat_t,   eta = gamma / k (canonical)

With gains in [0, 1] and gamma = min(1, sqrt(k ln k / ((e - 1) g))) for g >= G_max, the expected regret is
at most (e - 1) gamma G_max + k ln k / gamma <= 2 sqrt(e - 1) sqrt(g k ln k) ~ 2.63 sqrt(g k ln k)
(Auer et al. 2002, Theorem 3.1 and Corollary 3.2).
"""

from __future__ import annotations

import math

import numpy as np

from amalab.mixers.base import Stateful, check_k, per_run, require_finite
from amalab.mixers.logspace import softmax
from amalab.mixers.task_batches import sample_tasks


def exp3_gamma(k: int, horizon):
    """Auer et al.'s exploration rate min(1, sqrt(k ln k / ((e - 1) g))) for gains summing to at most
    ``horizon`` = g (Corollary 3.2); ``horizon`` may be an array (one rate per entry)."""
    horizon = np.asarray(horizon, dtype=float)
    if np.any(horizon <= 0) or not np.all(np.isfinite(horizon)):
        raise ValueError(f"EXP3's horizon must be finite and > 0, got {horizon}")
    # k = 1: nothing to explore against, and the formula's ln k = 0 would give gamma = 0; p is 1 anyway
    gamma = np.minimum(1.0, np.sqrt(k * math.log(k) / ((math.e - 1.0) * horizon))) if k > 1 else np.ones_like(horizon)
    return float(gamma) if gamma.ndim == 0 else gamma


def exp3_regret_bound(k: int, gamma, g_max):
    """Auer et al. 2002, Theorem 3.1: expected regret <= (e - 1) gamma G_max + k ln k / gamma."""
    return (math.e - 1.0) * np.asarray(gamma) * g_max + k * math.log(k) / np.asarray(gamma)


class Exp3(Stateful):
    """EXP3 over ``k`` arms; ``gamma`` (and ``eta``) may be given per run for batched runs."""

    state_keys = ("log_weights",)

    def __init__(self, k: int, gamma, eta=None, batch_shape: tuple[int, ...] = ()):
        self.k = check_k(k)
        self.batch_shape = tuple(batch_shape)
        self.gamma = per_run(gamma, self.batch_shape, "gamma", 0.0, 1.0, low_open=True)
        self.eta = self.gamma / self.k if eta is None else per_run(eta, self.batch_shape, "eta", 0.0, np.inf)
        self.log_weights = np.zeros(self.batch_shape + (self.k,))

    def probs(self) -> np.ndarray:
        """p = (1 - gamma) softmax(log w) + gamma / k; every p_i >= gamma / k.

        Computed afresh at every call (no cache: a cache keyed on the log-weights array went stale when a
        caller wrote into that array in place); a fresh array is also the caller's to modify.
        """
        return (1.0 - self.gamma) * softmax(self.log_weights) + self.gamma / self.k

    def draw(self, rng: np.random.Generator, size: int = 1) -> np.ndarray:
        """``size`` arms per run, i.i.d. from the current p: shape ``batch_shape + (size,)``."""
        return sample_tasks(rng, self.probs(), size)

    def update(self, gains: np.ndarray) -> np.ndarray:
        """Observe gains for the arms drawn from the current p (0 for the others); return xhat.

        The log-weights are re-centred on their maximum, which changes no probability (softmax is
        shift-invariant) and keeps them finite however large the cumulative gains grow.
        """
        xhat = np.asarray(gains, dtype=float) / self.probs()
        log_w = self.log_weights + self.eta * xhat
        self.log_weights = log_w - log_w.max(axis=-1, keepdims=True)
        return xhat

    def check_state(self, state) -> None:
        # any finite log-weights are a valid state: p is invariant to a shift of a row, so no
        # normalization is required (update re-centres them on the row maximum only to stay finite)
        require_finite("log_weights", state["log_weights"])
