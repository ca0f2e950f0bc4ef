"""Exponentiated-gradient ascent on the simplex, kept in log space (docs/maths.md (4a)).

    alpha_{t+1} = argmax_{a in simplex} eta <g, a> - KL(a || alpha_t)  =  alpha_t * exp(eta g) / Z

optionally smoothed toward uniform, alpha <- (1 - c) alpha + c / k (DoReMi uses c = 1e-3).
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.base import Stateful, check_k, per_run, require_log_simplex
from amalab.mixers.logspace import log_normalize


class ExpGradWeights(Stateful):
    """Simplex weights updated by exponentiated gradient ascent; starts uniform."""

    state_keys = ("log_weights",)

    def __init__(self, k: int, eta, smoothing=0.0, batch_shape: tuple[int, ...] = ()):
        self.k = check_k(k)
        self.batch_shape = tuple(batch_shape)
        self.eta = per_run(eta, self.batch_shape, "eta_alpha", 0.0, np.inf)
        self.smoothing = per_run(smoothing, self.batch_shape, "smoothing", 0.0, 1.0)
        self.log_weights = np.full(self.batch_shape + (self.k,), -np.log(self.k))

    @property
    def weights(self) -> np.ndarray:
        return np.exp(self.log_weights)

    def update(self, gains: np.ndarray) -> np.ndarray:
        """One ascent step on the gains ``g`` (``(..., k)``); returns the new weights."""
        log_w = log_normalize(self.log_weights + self.eta * gains)
        if np.any(self.smoothing > 0):
            # in log space, so a run with c = 0 keeps its exact log-weights even when batched with others
            with np.errstate(divide="ignore"):
                log_w = np.logaddexp(np.log1p(-self.smoothing) + log_w, np.log(self.smoothing / self.k))
        self.log_weights = log_w
        return self.weights

    def check_state(self, state) -> None:
        require_log_simplex("log_weights", state["log_weights"])
