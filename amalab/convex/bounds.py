"""Step sizes and gap bounds for the averaged iterate theta_bar = mean_{t<=T} theta_t (docs/maths.md section 5).

Notation: D = 2R the domain's diameter, G the largest per-example gradient norm of e on it, Bl the largest
per-example e, k tasks, T steps. All bounds are on max_i E_i(theta_bar) - OPT (the primal gap), through the
duality gap of (theta_bar, alpha_bar) <= (Regret_theta + Regret_alpha) / T.
"""

from __future__ import annotations

import math

import numpy as np

from amalab.mixers.exp3 import exp3_gamma


def theta_step_size(D: float, G: float, T):
    """eta_theta = D / (G sqrt(T)): projected OGD regret <= D G sqrt(T)."""
    return D / (G * np.sqrt(T))


def alpha_step_size(k: int, Bl: float, T):
    """eta_alpha = sqrt(8 ln k / T) / Bl: EG regret on gains in [0, Bl] <= Bl sqrt(T ln(k) / 2)."""
    return np.sqrt(8.0 * math.log(k) / np.asarray(T, dtype=float)) / Bl


def ama_s_gamma(k: int, T) -> np.ndarray:
    """gamma = min(1, sqrt(k ln k / ((e - 1) T))) (Auer et al. 2002, Corollary 3.2), per horizon."""
    return np.array([exp3_gamma(k, float(t)) for t in np.atleast_1d(T)]).reshape(np.shape(T))


def ama_r_bound(D, G, Bl, k, T):
    """Deterministic AMA-R (full batches): (D G + Bl sqrt(ln(k) / 2)) / sqrt(T)."""
    return (D * G + Bl * math.sqrt(math.log(k) / 2.0)) / np.sqrt(T)


def ama_r_minibatch_bound(D, G, Bl, k, T):
    """Minibatch AMA-R, in expectation:

        [3 D G + 3 Bl sqrt(ln(k) / 2)] / sqrt(T)  +  (2 D G + Bl) (exp(eta_alpha Bl) - 1)

    The first term is the deterministic regret plus Nemirovski et al. (2009)'s ghost-iterate bound on the
    sampling noise (noise norms at most 2G and 2Bl double each regret). The second pays for theta_t's
    step using alpha_{t+1}, which saw the same batch: each EG step moves alpha by at most
    exp(eta_alpha Bl) - 1 in l1, so the correlation costs at most (2 D G + Bl) times that per step.
    With eta_alpha Bl = sqrt(8 ln k / T) the whole bound is O(1 / sqrt(T)).
    """
    T = np.asarray(T, dtype=float)
    first = 3.0 * (D * G + Bl * math.sqrt(math.log(k) / 2.0)) / np.sqrt(T)
    return first + (2.0 * D * G + Bl) * np.expm1(np.sqrt(8.0 * math.log(k) / T))


def ama_r_simultaneous_bound(D, G, Bl, k, T):
    """Minibatch AMA-R with simultaneous play (docs/maths.md (4c)), in expectation (docs/maths.md (11s)):

        3 (D G + Bl sqrt(ln(k) / 2)) / sqrt(T)

    the first term of :func:`ama_r_minibatch_bound`: theta_t steps with alpha_t, which was fixed before
    the batch was drawn, so both players' gradients are unbiased given the past and the correlation term
    of sequential play does not arise. Proved in docs/maths.md after (11s): the two players' regrets plus
    a ghost-iterate bound on each player's sampling noise (Nemirovski et al. 2009, section 3).
    """
    return 3.0 * (D * G + Bl * math.sqrt(math.log(k) / 2.0)) / np.sqrt(np.asarray(T, dtype=float))


def ama_s_bound(D, G, Bl, k, T):
    """AMA-S, in expectation, as the AMA paper states it: (D G + 2.63 Bl sqrt(k ln k)) / sqrt(T).

    2.63 sqrt(T k ln k) is EXP3's regret bound on gains in [0, 1], scaled by Bl; the paper leaves out the
    constant of the stochastic saddle-point argument (compare Sagawa et al. 2019, Proposition 2).
    """
    return (D * G + 2.0 * math.sqrt(math.e - 1.0) * Bl * math.sqrt(k * math.log(k))) / np.sqrt(T)
