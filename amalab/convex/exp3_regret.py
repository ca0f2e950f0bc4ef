"""EXP3's regret on oblivious adversarial gain sequences, against Auer et al.'s bound (spec section 6).

Regret at horizon T: G_max(T) - E[sum_t x_{t, I_t}], where G_max(T) = max_i sum_{t<T} x_{t,i}. The
expectation over EXP3's draws is estimated by the mean over seeds of sum_t p_t . x_t (the conditional
expectation of the gain at each step, an unbiased and lower-variance stand-in for x_{t, I_t}).
"""

from __future__ import annotations

import math

import numpy as np

from amalab.mixers import Exp3, exp3_gamma, exp3_regret_bound

SEQUENCES = {
    "bernoulli": "i.i.d. Bernoulli gains with means spread over [0.3, 0.7]",
    "switching": "the good arm (gain 1, others 0) changes at t = 2^j, cycling through the arms",
    "sinusoid": "gains 0.5 + 0.5 sin(2 pi t / 4096 + 2 pi i / k): every arm is best in turn",
}


def gains_at(sequence: str, t: int, k: int, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """The gain vector x_t in [0, 1]^k of each row."""
    if sequence == "bernoulli":
        return (rng.random((n_rows, k)) < np.linspace(0.3, 0.7, k)).astype(float)
    if sequence == "switching":
        x = np.zeros(k)
        x[int(math.log2(t + 1)) % k] = 1.0
        return np.broadcast_to(x, (n_rows, k))
    if sequence == "sinusoid":
        x = 0.5 + 0.5 * np.sin(2 * math.pi * t / 4096 + 2 * math.pi * np.arange(k) / k)
        return np.broadcast_to(x, (n_rows, k))
    raise ValueError(f"unknown gain sequence {sequence!r}; known: {', '.join(SEQUENCES)}")


def exp3_regret(sequence: str, k: int, horizons, seeds: int, rng: np.random.Generator, progress=None
                ) -> dict:
    """Mean regret over ``seeds`` runs at each horizon (each its own run, gamma tuned for it)."""
    horizons = np.asarray(horizons, dtype=np.int64)
    rows = np.repeat(horizons, seeds)
    gamma = np.array([exp3_gamma(k, float(T)) for T in rows])
    bandit = Exp3(k, gamma, batch_shape=rows.shape)
    cumulative = np.zeros((len(rows), k))
    expected_gain = np.zeros(len(rows))
    regret = np.zeros(len(rows))
    g_max = np.zeros(len(rows))
    for t in range(int(horizons.max())):
        x = gains_at(sequence, t, k, len(rows), rng)
        probs = bandit.probs()
        arm = bandit.draw(rng, 1)
        expected_gain += np.einsum("rk,rk->r", probs, x)
        cumulative += x
        bandit.update(np.where(np.arange(k) == arm, x, 0.0))
        finished = rows == t + 1
        g_max[finished] = cumulative[finished].max(axis=1)
        regret[finished] = g_max[finished] - expected_gain[finished]
        if progress is not None and ((t + 1) % 1024 == 0 or t + 1 == horizons.max()):
            progress(t + 1)
    regret, g_max = regret.reshape(len(horizons), seeds), g_max.reshape(len(horizons), seeds)
    gamma = gamma.reshape(len(horizons), seeds)[:, 0]
    return dict(
        horizons=horizons.tolist(), gamma=gamma.tolist(), mean_regret=regret.mean(axis=1).tolist(),
        stderr=(regret.std(axis=1, ddof=1) / math.sqrt(seeds)).tolist() if seeds > 1 else [0.0] * len(horizons),
        bound=exp3_regret_bound(k, gamma, g_max.mean(axis=1)).tolist(),
    )
