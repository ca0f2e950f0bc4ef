"""EXP3's regret on oblivious adversarial gain sequences, against Auer et al.'s bound (docs/maths.md section 6).

Regret at horizon T: G_max(T) - E[sum_t x_{t, I_t}], where G_max(T) = max_i sum_{t<T} x_{t,i}. The
expectation over EXP3's draws is estimated by the mean over seeds of sum_t p_t . x_t (the conditional
expectation of the gain at each step, an unbiased and lower-variance stand-in for x_{t, I_t}).
"""

from __future__ import annotations

import math

import numpy as np

import numba

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


def _numpy_regret(sequence, k, rows, gamma, rng, progress):
    """The reference loop: :class:`amalab.mixers.Exp3` step by step, every row to the longest horizon."""
    bandit = Exp3(k, gamma, batch_shape=rows.shape)
    cumulative = np.zeros((len(rows), k))
    expected_gain = np.zeros(len(rows))
    regret = np.zeros(len(rows))
    g_max = np.zeros(len(rows))
    t_max = int(rows.max())
    for t in range(t_max):
        x = gains_at(sequence, t, k, len(rows), rng)
        probs = bandit.probs()
        arm = bandit.draw(rng, 1)
        expected_gain += np.einsum("rk,rk->r", probs, x)
        cumulative += x
        bandit.update(np.where(np.arange(k) == arm, x, 0.0))
        finished = rows == t + 1
        g_max[finished] = cumulative[finished].max(axis=1)
        regret[finished] = g_max[finished] - expected_gain[finished]
        if progress is not None and ((t + 1) % 1024 == 0 or t + 1 == t_max):
            progress(t + 1)
    return regret, g_max


@numba.njit(cache=True, error_model="numpy")
def _exp3_steps(sequence_kind, t0, gain_uniforms, arm_uniforms, means, rows, gamma, eta, log_w, cumulative, expected_gain,
                regret, g_max):
    """Steps t0 .. t0 + len(arm_uniforms) - 1 of every row still short of its horizon, in place: the same
    arithmetic as the reference loop on the same uniforms."""
    n_rows, k = log_w.shape
    probs, x = np.empty(k), np.empty(k)
    for r in range(n_rows):
        for s in range(arm_uniforms.shape[0]):
            t = t0 + s
            if t >= rows[r]:
                break
            for i in range(k):
                if sequence_kind == 0:
                    x[i] = 1.0 if gain_uniforms[s, r, i] < means[i] else 0.0
                elif sequence_kind == 1:
                    x[i] = 1.0 if i == int(math.log2(t + 1)) % k else 0.0
                else:
                    x[i] = 0.5 + 0.5 * math.sin(2 * math.pi * t / 4096 + 2 * math.pi * i / k)
            top = -np.inf  # loops, not log_w[r].max(): a view per step would cost atomic reference counts
            for i in range(k):
                top = max(top, log_w[r, i])
            total = 0.0
            for i in range(k):
                probs[i] = math.exp(log_w[r, i] - top)
                total += probs[i]
            uniform, arm, acc, gain = arm_uniforms[s, r], 0, 0.0, 0.0
            for i in range(k):
                probs[i] = (1.0 - gamma[r]) * (probs[i] / total) + gamma[r] / k
                acc += probs[i]
                if i < k - 1 and uniform >= acc:  # inverse CDF, the last task's bound infinite
                    arm += 1
                gain += probs[i] * x[i]
                cumulative[r, i] += x[i]
            expected_gain[r] += gain
            for i in range(k):
                log_w[r, i] += eta[r] * ((x[i] if i == arm else 0.0) / probs[i])
            top = -np.inf
            for i in range(k):
                top = max(top, log_w[r, i])
            for i in range(k):
                log_w[r, i] -= top
            if t + 1 == rows[r]:
                g_max[r] = -np.inf
                for i in range(k):
                    g_max[r] = max(g_max[r], cumulative[r, i])
                regret[r] = g_max[r] - expected_gain[r]


def _compiled_regret(sequence, k, rows, gamma, rng, progress):
    """The kernel above in blocks of 1024 steps (uniforms drawn per block, in the reference's order)."""
    eta = gamma / k
    n_rows, t_max = len(rows), int(rows.max())
    log_w, cumulative = np.zeros((n_rows, k)), np.zeros((n_rows, k))
    expected_gain, regret, g_max = np.zeros(n_rows), np.zeros(n_rows), np.zeros(n_rows)
    gains_drawn = k if sequence == "bernoulli" else 0  # per row and step, before the arms' uniforms
    means = np.linspace(0.3, 0.7, k)
    kind = list(SEQUENCES).index(sequence)
    for t0 in range(0, t_max, 1024):
        steps = min(1024, t_max - t0)
        uniforms = rng.random((steps, n_rows * (gains_drawn + 1)))
        gain_uniforms = uniforms[:, :n_rows * gains_drawn].reshape(steps, n_rows, gains_drawn)
        arm_uniforms = uniforms[:, n_rows * gains_drawn:]
        _exp3_steps(kind, t0, np.ascontiguousarray(gain_uniforms), np.ascontiguousarray(arm_uniforms), means,
                    rows, gamma, eta, log_w, cumulative, expected_gain, regret, g_max)
        if progress is not None:
            progress(t0 + steps)
    return regret, g_max


def exp3_regret(sequence: str, k: int, horizons, seeds: int, rng: np.random.Generator, progress=None,
                engine: str = "compiled") -> dict:
    """Mean regret over ``seeds`` runs at each horizon (each its own run, gamma tuned for it).

    ``engine`` "numpy" runs the reference loop (:class:`amalab.mixers.Exp3`); "compiled" the numba kernel,
    which gives the same numbers to rounding from the same random numbers.
    """
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown gain sequence {sequence!r}; known: {', '.join(SEQUENCES)}")
    horizons = np.asarray(horizons, dtype=np.int64)
    rows = np.repeat(horizons, seeds)
    gamma = np.array([exp3_gamma(k, float(T)) for T in rows])
    run = _compiled_regret if engine == "compiled" else _numpy_regret
    regret, g_max = run(sequence, k, rows, gamma, rng, progress)
    regret, g_max = regret.reshape(len(horizons), seeds), g_max.reshape(len(horizons), seeds)
    gamma = gamma.reshape(len(horizons), seeds)[:, 0]
    return dict(
        horizons=horizons.tolist(), gamma=gamma.tolist(), mean_regret=regret.mean(axis=1).tolist(),
        stderr=(regret.std(axis=1, ddof=1) / math.sqrt(seeds)).tolist() if seeds > 1 else [0.0] * len(horizons),
        bound=exp3_regret_bound(k, gamma, g_max.mean(axis=1)).tolist(),
    )
