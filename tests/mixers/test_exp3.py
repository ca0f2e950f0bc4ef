"""Property tests of EXP3 (docs/maths.md (13)-(16)) and of AMA-S's importance-weighted gains ((5c), (15)).

Every number is checked against something computed independently of amalab: exact enumeration of the
draws, the closed-form probabilities, or Auer et al.'s regret bound.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amalab.mixers.ama_s import AMAS
from amalab.mixers.exp3 import Exp3, exp3_gamma, exp3_regret_bound

# gamma in (0, 1]; below ~1e-300 the importance weight 1/p itself overflows, which no run will meet
GAMMAS = st.one_of(st.floats(min_value=1e-9, max_value=1.0), st.just(1.0))


def reference_probs(log_weights: np.ndarray, gamma: float, k: int) -> np.ndarray:
    """p = (1 - gamma) softmax(logw) + gamma / k, written out independently (stable softmax)."""
    z = np.asarray(log_weights, dtype=float)
    w = np.exp(z - z.max(axis=-1, keepdims=True))
    return (1.0 - gamma) * w / w.sum(axis=-1, keepdims=True) + gamma / k


@st.composite
def gain_histories(draw, batch_shape=()):
    k = draw(st.integers(1, 8))
    gamma = draw(GAMMAS)
    steps = draw(st.integers(0, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    gains = np.random.default_rng(seed).random((steps,) + batch_shape + (k,))
    # some histories give every gain to one arm, or only 0/1 gains
    mode = draw(st.sampled_from(["uniform", "one-arm", "binary"]))
    if mode == "one-arm":
        gains = np.zeros_like(gains)
        gains[..., 0] = 1.0
    elif mode == "binary":
        gains = (gains > 0.5).astype(float)
    return k, gamma, gains


def check_distribution(p: np.ndarray, gamma: float, k: int) -> None:
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(p >= gamma / k)


# ---------------------------------------------------------------------------------------------------
# p is a distribution with p_i >= gamma / k, whatever the history


@settings(max_examples=80, deadline=None, derandomize=True)
@given(gain_histories())
def test_probs_on_simplex_with_exploration_floor(history):
    k, gamma, gains = history
    exp3 = Exp3(k, gamma)
    check_distribution(exp3.probs(), gamma, k)
    for x in gains:
        exp3.update(x)
        p = exp3.probs()
        check_distribution(p, gamma, k)
        np.testing.assert_allclose(p, reference_probs(exp3.log_weights, gamma, k), rtol=0, atol=1e-13)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(gain_histories(batch_shape=(3,)))
def test_probs_on_simplex_batched(history):
    k, gamma, gains = history
    exp3 = Exp3(k, gamma, batch_shape=(3,))
    singles = [Exp3(k, gamma) for _ in range(3)]
    for x in gains:
        exp3.update(x)
        for run, single in enumerate(singles):
            single.update(x[run])
        p = exp3.probs()
        assert p.shape == (3, k)
        check_distribution(p, gamma, k)
        # each row of a batched run is exactly the run on its own
        np.testing.assert_allclose(p, np.stack([s.probs() for s in singles]), rtol=0, atol=1e-14)


def test_probs_with_per_run_gamma():
    gammas = np.array([0.05, 0.5, 1.0])
    exp3 = Exp3(4, gammas, batch_shape=(3,))
    rng = np.random.default_rng(0)
    for _ in range(20):
        exp3.update(rng.random((3, 4)))
    p = exp3.probs()
    for run, gamma in enumerate(gammas):
        check_distribution(p[run], gamma, 4)
    np.testing.assert_allclose(p[2], 0.25, rtol=0, atol=1e-15)  # gamma = 1 is uniform play


@settings(max_examples=60, deadline=None, derandomize=True)
@given(k=st.integers(1, 8), gamma=GAMMAS, seed=st.integers(0, 2**32 - 1),
       shift=st.floats(min_value=-1e6, max_value=1e6))
def test_constant_shift_of_log_weights_changes_no_probability(k, gamma, seed, shift):
    logw = np.random.default_rng(seed).normal(scale=5.0, size=k)
    a, b = Exp3(k, gamma), Exp3(k, gamma)
    a.load_state_dict({"log_weights": logw})
    b.load_state_dict({"log_weights": logw + shift})
    np.testing.assert_allclose(b.probs(), a.probs(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.probs(), reference_probs(logw, gamma, k), rtol=0, atol=1e-13)
    # and the same update keeps them equal
    x = np.random.default_rng(seed + 1).random(k)
    a.update(x)
    b.update(x)
    np.testing.assert_allclose(b.probs(), a.probs(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# unbiasedness: E[xhat_i] = x_i, by exact enumeration of the draw


@settings(max_examples=60, deadline=None, derandomize=True)
@given(k=st.integers(1, 8), gamma=GAMMAS, seed=st.integers(0, 2**32 - 1))
def test_xhat_unbiased_single_draw(k, gamma, seed):
    rng = np.random.default_rng(seed)
    logw = rng.normal(scale=3.0, size=k)
    x = rng.random(k)
    p = reference_probs(logw, gamma, k)
    # one run per possible drawn arm j: the gain vector is observed at j only
    exp3 = Exp3(k, gamma, batch_shape=(k,))
    exp3.load_state_dict({"log_weights": np.tile(logw, (k, 1))})
    observed = np.diag(x)
    xhat = exp3.update(observed)  # row j: the estimate when arm j was drawn
    expected = p @ xhat  # sum_j P(draw j) * xhat^(j)
    np.testing.assert_allclose(expected, x, rtol=0, atol=1e-12)
    # importance weight on the drawn arm, zero elsewhere
    np.testing.assert_allclose(np.diag(xhat), x / p, rtol=1e-14)
    assert np.all(xhat[~np.eye(k, dtype=bool)] == 0.0)


def enumerate_amas(k, batch, gamma, logw, scale, losses_per_task, refs_per_task, draw_per):
    """(E[xhat], E_i / scale) for AMA-S's gains, E[] by enumerating every task-id sequence of the batch."""
    if draw_per == "example":
        seqs = np.array(list(itertools.product(range(k), repeat=batch)))
    else:
        seqs = np.repeat(np.arange(k)[:, None], batch, axis=1)
    n = len(seqs)
    mixer = AMAS(k, gamma, gain_scale=scale, draw_per=draw_per, batch_shape=(n,))
    mixer.load_state_dict({**mixer.state_dict(), "exp3.log_weights": np.tile(logw, (n, 1))})
    p = mixer.weights[0].copy()
    np.testing.assert_allclose(p, reference_probs(logw, gamma, k), rtol=0, atol=1e-13)
    captured = {}
    update = mixer.exp3.update

    def spy(gains):
        captured["xhat"] = update(gains)
        return captured["xhat"]

    mixer.exp3.update = spy
    losses = np.asarray(losses_per_task, dtype=float)[seqs]
    refs = np.asarray(refs_per_task, dtype=float)[seqs]
    mixer.step(seqs, losses, refs)
    if draw_per == "example":
        prob = np.prod(p[seqs], axis=1)
    else:
        prob = p.copy()
    assert math.isclose(prob.sum(), 1.0, abs_tol=1e-12)
    mean_xhat = prob @ captured["xhat"]
    excess = np.maximum(np.asarray(losses_per_task) - np.asarray(refs_per_task), 0.0)
    return mean_xhat, excess / scale


@pytest.mark.parametrize("k,batch", [(3, 3), (2, 4), (4, 2)])
@pytest.mark.parametrize("draw_per", ["example", "step"])
def test_amas_batched_gains_unbiased(k, batch, draw_per):
    rng = np.random.default_rng(100 * k + batch)
    for gamma in (0.07, 0.4, 1.0):
        logw = rng.normal(scale=2.0, size=k)
        refs = rng.random(k)
        losses = refs + rng.uniform(-0.5, 1.5, size=k)  # some tasks below their reference: E_i = 0
        losses[0] = refs[0] + 1.25  # at least one task with a positive excess
        scale = 2.0  # >= every E_i, so no gain is clipped
        mean_xhat, target = enumerate_amas(k, batch, gamma, logw, scale, losses, refs, draw_per)
        np.testing.assert_allclose(mean_xhat, target, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# no overflow


def test_huge_cumulative_gain_does_not_overflow():
    k, gamma = 4, 0.1
    exp3 = Exp3(k, gamma)
    gains = np.array([1.0, 0.0, 0.0, 0.0])
    steps = 10**5
    for _ in range(steps):
        exp3.update(gains)
    p = exp3.probs()
    assert np.all(np.isfinite(exp3.log_weights))
    check_distribution(p, gamma, k)
    # the un-centred log-weight of arm 0 would be ~ steps * eta / p_0 >> 709 (exp overflow)
    assert steps * (gamma / k) / p[0] > 1e3
    np.testing.assert_allclose(p, [1 - gamma + gamma / k] + [gamma / k] * 3, rtol=0, atol=1e-15)
    # the dominated arms keep exactly equal weights
    assert exp3.log_weights[1] == exp3.log_weights[2] == exp3.log_weights[3]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(k=st.integers(1, 8), gamma=GAMMAS, eta=st.floats(min_value=1.0, max_value=1e12),
       seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 40))
def test_huge_eta_does_not_overflow(k, gamma, eta, seed, steps):
    exp3 = Exp3(k, gamma, eta=eta)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        exp3.update(rng.random(k))
        p = exp3.probs()
        check_distribution(p, gamma, k)
        assert np.all(np.isfinite(exp3.log_weights))
        assert exp3.log_weights.max() == 0.0  # re-centred


# ---------------------------------------------------------------------------------------------------
# determinism and state


def drive(exp3: Exp3, rng: np.random.Generator, steps: int, size: int = 5):
    draws, probs = [], []
    gains_rng = np.random.default_rng(1234)
    for _ in range(steps):
        ids = exp3.draw(rng, size)
        probs.append(exp3.probs().copy())
        draws.append(ids)
        gains = np.zeros(exp3.batch_shape + (exp3.k,))
        np.put_along_axis(gains, ids[..., :1], gains_rng.random(exp3.batch_shape + (1,)), axis=-1)
        exp3.update(gains)
    return np.array(draws), np.array(probs)


@pytest.mark.parametrize("batch_shape", [(), (3,)])
def test_same_seed_same_draws(batch_shape):
    d1, p1 = drive(Exp3(5, 0.2, batch_shape=batch_shape), np.random.default_rng(7), 50)
    d2, p2 = drive(Exp3(5, 0.2, batch_shape=batch_shape), np.random.default_rng(7), 50)
    d3, _ = drive(Exp3(5, 0.2, batch_shape=batch_shape), np.random.default_rng(8), 50)
    assert d1.shape == (50,) + batch_shape + (5,)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(p1, p2)
    assert not np.array_equal(d1, d3)
    assert d1.min() >= 0 and d1.max() < 5


@pytest.mark.parametrize("batch_shape", [(), (3,)])
def test_state_dict_round_trip(batch_shape):
    a = Exp3(5, 0.2, batch_shape=batch_shape)
    drive(a, np.random.default_rng(1), 30)
    state = a.state_dict()
    # the state is a copy: changing a afterwards does not change it
    logw_before = state["log_weights"].copy()
    a_rng = np.random.default_rng(99)
    da, pa = drive(a, a_rng, 40)
    np.testing.assert_array_equal(state["log_weights"], logw_before)

    b = Exp3(5, 0.2, batch_shape=batch_shape)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.log_weights, logw_before)
    db, pb = drive(b, np.random.default_rng(99), 40)
    np.testing.assert_array_equal(da, db)
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(a.log_weights, b.log_weights)
    # the loaded state is a copy too
    state["log_weights"][...] = 123.0
    assert not np.any(b.log_weights == 123.0)


def test_load_state_dict_rejects_bad_state():
    exp3 = Exp3(4, 0.3)
    with pytest.raises(ValueError, match="missing"):
        exp3.load_state_dict({})
    with pytest.raises(ValueError, match="unexpected"):
        exp3.load_state_dict({"log_weights": np.zeros(4), "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        exp3.load_state_dict({"logweights": np.zeros(4)})
    with pytest.raises(ValueError, match="shape"):
        exp3.load_state_dict({"log_weights": np.zeros(5)})
    with pytest.raises(ValueError, match="shape"):
        Exp3(4, 0.3, batch_shape=(2,)).load_state_dict({"log_weights": np.zeros(4)})
    np.testing.assert_array_equal(exp3.log_weights, np.zeros(4))  # nothing was loaded


# ---------------------------------------------------------------------------------------------------
# regret on oblivious adversarial sequences


def expected_gain(gains: np.ndarray, gamma: float, n_seeds: int, seed: int) -> np.ndarray:
    """sum_t p_t . x_t for each of n_seeds independent EXP3 runs on the gain sequence (T, k)."""
    horizon, k = gains.shape
    exp3 = Exp3(k, gamma, batch_shape=(n_seeds,))
    rng = np.random.default_rng(seed)
    total = np.zeros(n_seeds)
    rows = np.arange(n_seeds)
    for t in range(horizon):
        p = exp3.probs()
        total += p @ gains[t]
        arm = exp3.draw(rng, 1)[:, 0]
        observed = np.zeros((n_seeds, k))
        observed[rows, arm] = gains[t, arm]
        exp3.update(observed)
    return total


def switching_sequence(horizon, k):
    x = np.full((horizon, k), 0.1)
    x[: int(0.4 * horizon), 0] = 1.0  # arm 0 leads early ...
    x[int(0.4 * horizon):, 1] = 1.0  # ... arm 1 wins overall
    return x


def sinusoidal_sequence(horizon, k):
    t = np.arange(horizon)[:, None]
    phase = 2 * np.pi * np.arange(k) / k
    return 0.5 + 0.45 * np.sin(2 * np.pi * t / 300.0 + phase) + 0.05 * (np.arange(k) == 2)


def bernoulli_sequence(horizon, k):
    means = np.linspace(0.3, 0.7, k)
    return (np.random.default_rng(2024).random((horizon, k)) < means).astype(float)


@pytest.mark.parametrize("make", [switching_sequence, sinusoidal_sequence, bernoulli_sequence])
def test_mean_regret_under_auer_bound(make):
    horizon, k, n_seeds = 1500, 4, 200
    gains = make(horizon, k)
    assert gains.min() >= 0 and gains.max() <= 1
    gamma = exp3_gamma(k, horizon)
    g_max = gains.sum(axis=0).max()
    totals = expected_gain(gains, gamma, n_seeds, seed=11)
    regret = g_max - totals.mean()
    bound = float(exp3_regret_bound(k, gamma, g_max))
    assert regret <= bound, (regret, bound)
    # an independent statement of Theorem 3.1's bound and Corollary 3.2's gamma
    assert math.isclose(gamma, min(1.0, math.sqrt(k * math.log(k) / ((math.e - 1) * horizon))))
    assert math.isclose(bound, (math.e - 1) * gamma * g_max + k * math.log(k) / gamma)
    assert bound <= 2 * math.sqrt(math.e - 1) * math.sqrt(horizon * k * math.log(k)) + 1e-9
    if make is bernoulli_sequence:
        # EXP3 learns: its regret is far below that of uniform play on a stochastic sequence
        uniform_regret = g_max - gains.mean(axis=1).sum()
        assert regret < 0.5 * uniform_regret


def test_regret_bound_and_gamma_edge_cases():
    assert exp3_gamma(1, 100) == 1.0
    assert exp3_gamma(10, 1) == 1.0  # short horizons explore fully
    assert float(exp3_regret_bound(1, 1.0, 50.0)) == pytest.approx(50.0 * (math.e - 1))
    np.testing.assert_allclose(
        exp3_regret_bound(3, np.array([0.1, 0.5]), 10.0),
        (math.e - 1) * np.array([0.1, 0.5]) * 10.0 + 3 * math.log(3) / np.array([0.1, 0.5]),
    )


# ---------------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan")])
def test_gamma_out_of_range_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        Exp3(3, gamma)
    with pytest.raises(ValueError, match="gamma"):
        Exp3(3, [0.5, gamma], batch_shape=(2,))
    with pytest.raises(ValueError, match="gamma"):
        AMAS(3, gamma)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3"])
def test_bad_number_of_arms_rejected(k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        Exp3(k, 0.5)


def test_gamma_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="gamma"):
        Exp3(3, [0.1, 0.2, 0.3], batch_shape=(2,))


def test_negative_eta_rejected():
    with pytest.raises(ValueError, match="eta"):
        Exp3(3, 0.5, eta=-1.0)


def test_infinite_eta_rejected():
    """BUG: eta = inf passes validation (per_run's upper end is closed at inf) and the first update makes
    every probability NaN (inf * 0 for the arms that were not drawn). eta must be finite."""
    with pytest.raises(ValueError, match="eta"):
        Exp3(3, 0.5, eta=float("inf"))


def test_returned_probabilities_are_not_internal_state():
    """BUG (aliasing): ``Exp3.probs()`` caches p and returns the cached array itself, so a caller who
    edits the array it got (``AMAS.weights`` hands it to trainers and loggers) silently changes the
    distribution the next ``draw`` and ``update`` use. Return a read-only array (or a copy)."""
    exp3 = Exp3(3, 0.5)
    exp3.load_state_dict({"log_weights": np.array([0.0, 1.0, 2.0])})
    expected = reference_probs(np.array([0.0, 1.0, 2.0]), 0.5, 3)
    p = exp3.probs()
    try:
        p[:] = [1.0, 0.0, 0.0]
    except ValueError:
        pass  # a read-only array is a fine answer
    np.testing.assert_allclose(exp3.probs(), expected, rtol=0, atol=1e-15)


def test_probabilities_follow_loaded_state_and_updates():
    exp3 = Exp3(3, 0.2)
    np.testing.assert_allclose(exp3.probs(), 1 / 3, rtol=1e-15)
    logw = np.array([2.0, -1.0, 0.5])
    exp3.load_state_dict({"log_weights": logw})
    np.testing.assert_allclose(exp3.probs(), reference_probs(logw, 0.2, 3), rtol=0, atol=1e-15)
    x = np.array([0.0, 0.7, 0.0])
    p = reference_probs(logw, 0.2, 3)
    exp3.update(x)
    np.testing.assert_allclose(exp3.probs(), reference_probs(logw + 0.2 / 3 * x / p, 0.2, 3),
                               rtol=0, atol=1e-15)
