"""Exponentiated-gradient weights (docs/maths.md (4a)): the KL-prox step, checked against cvxpy."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amalab.mixers.exponentiated_gradient import ExpGradWeights


def kl_prox(alpha_prev: np.ndarray, g: np.ndarray, eta: float) -> np.ndarray:
    """argmax_{a in simplex} eta <g, a> - KL(a || alpha_prev), solved by cvxpy (Clarabel)."""
    a = cp.Variable(len(alpha_prev), nonneg=True)
    objective = cp.Maximize(eta * (g @ a) - cp.sum(cp.rel_entr(a, alpha_prev)))
    problem = cp.Problem(objective, [cp.sum(a) == 1])
    with warnings.catch_warnings():
        # tolerances this tight sometimes end as "optimal_inaccurate", still ~1e-8 from the optimum;
        # the comparisons below are what decide
        warnings.simplefilter("ignore", UserWarning)
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12,
                      tol_ktratio=1e-10, max_iter=500)
    assert problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
    return np.clip(np.asarray(a.value), 0.0, None)


def prox_objective(a: np.ndarray, alpha_prev: np.ndarray, g: np.ndarray, eta: float) -> float:
    """eta <g, a> - KL(a || alpha_prev), with 0 log 0 = 0."""
    a = np.asarray(a, dtype=float)
    kl = np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / alpha_prev), 0.0))
    return float(eta * g @ a - kl)


@pytest.mark.parametrize("seed", range(8))
def test_update_is_the_kl_prox_step(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    alpha_prev = rng.dirichlet(np.full(k, 2.0))
    alpha_prev = 0.9 * alpha_prev + 0.1 / k  # keep every weight away from 0 for the solver
    g = rng.uniform(-1.0, 2.0, size=k)
    eta = float(rng.uniform(0.1, 3.0))
    eg = ExpGradWeights(k, eta)
    eg.load_state_dict({"log_weights": np.log(alpha_prev)})
    np.testing.assert_allclose(eg.weights, alpha_prev, rtol=1e-14)
    new = eg.update(g)
    solved = kl_prox(alpha_prev, g, eta)
    np.testing.assert_allclose(new, solved, rtol=0, atol=1e-6)
    # the update is the maximizer: no point cvxpy found does better
    solved = solved / solved.sum()
    assert prox_objective(new, alpha_prev, g, eta) >= prox_objective(solved, alpha_prev, g, eta) - 1e-9
    # the returned weights are the state
    np.testing.assert_allclose(eg.weights, new, rtol=0, atol=0)


def test_batched_update_matches_kl_prox_per_run():
    rng = np.random.default_rng(42)
    k, runs = 4, 3
    alpha_prev = 0.8 * rng.dirichlet(np.ones(k), size=runs) + 0.2 / k
    g = rng.normal(size=(runs, k))
    etas = np.array([0.2, 1.0, 2.5])
    eg = ExpGradWeights(k, etas, batch_shape=(runs,))
    eg.load_state_dict({"log_weights": np.log(alpha_prev)})
    new = eg.update(g)
    for r in range(runs):
        np.testing.assert_allclose(new[r], kl_prox(alpha_prev[r], g[r], etas[r]), rtol=0, atol=1e-6)


@st.composite
def histories(draw, batch_shape=()):
    k = draw(st.integers(1, 8))
    eta = draw(st.floats(min_value=0.0, max_value=50.0))
    smoothing = draw(st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1.0)))
    steps = draw(st.integers(1, 25))
    scale = draw(st.sampled_from([1.0, 10.0, 1e3]))
    seed = draw(st.integers(0, 2**32 - 1))
    gains = scale * np.random.default_rng(seed).normal(size=(steps,) + batch_shape + (k,))
    return k, eta, smoothing, gains


@settings(max_examples=80, deadline=None, derandomize=True)
@given(histories())
def test_weights_stay_on_simplex(history):
    k, eta, smoothing, gains = history
    eg = ExpGradWeights(k, eta, smoothing)
    np.testing.assert_allclose(eg.weights, 1.0 / k, rtol=1e-14)
    for g in gains:
        w = eg.update(g)
        assert np.all(np.isfinite(eg.log_weights) | (eg.log_weights == -np.inf))
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(), 1.0, rtol=0, atol=1e-12)
        # smoothing keeps every weight at or above c / k
        assert np.all(w >= smoothing / k * (1 - 1e-12))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(histories(batch_shape=(3,)))
def test_weights_stay_on_simplex_batched(history):
    k, eta, smoothing, gains = history
    eg = ExpGradWeights(k, eta, smoothing, batch_shape=(3,))
    for g in gains:
        w = eg.update(g)
        assert w.shape == (3, k)
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
        assert np.all(w >= smoothing / k * (1 - 1e-12))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(k=st.integers(1, 8), eta=st.floats(min_value=0.0, max_value=20.0),
       smoothing=st.floats(min_value=0.0, max_value=1.0),
       shift=st.floats(min_value=-100.0, max_value=100.0), seed=st.integers(0, 2**32 - 1))
def test_constant_added_to_gains_changes_nothing(k, eta, smoothing, shift, seed):
    rng = np.random.default_rng(seed)
    a = ExpGradWeights(k, eta, smoothing)
    b = ExpGradWeights(k, eta, smoothing)
    for _ in range(5):
        g = rng.normal(size=k)
        wa = a.update(g)
        wb = b.update(g + shift)
        np.testing.assert_allclose(wb, wa, rtol=1e-9, atol=1e-12)


def test_closed_form_multiplicative_update():
    rng = np.random.default_rng(3)
    k, eta = 5, 0.7
    eg = ExpGradWeights(k, eta)
    alpha = np.full(k, 1.0 / k)
    for _ in range(10):
        g = rng.uniform(0, 1, size=k)
        alpha = alpha * np.exp(eta * g)
        alpha /= alpha.sum()
        np.testing.assert_allclose(eg.update(g), alpha, rtol=1e-12)


def test_smoothing_closed_form():
    rng = np.random.default_rng(4)
    k, eta, c = 4, 1.3, 0.05
    eg = ExpGradWeights(k, eta, smoothing=c)
    alpha = np.full(k, 1.0 / k)
    for _ in range(10):
        g = rng.uniform(0, 2, size=k)
        alpha = alpha * np.exp(eta * g)
        alpha = (1 - c) * alpha / alpha.sum() + c / k
        np.testing.assert_allclose(eg.update(g), alpha, rtol=1e-12)
        assert np.all(eg.weights >= c / k * (1 - 1e-12))


def test_smoothing_one_is_uniform_and_eta_zero_keeps_uniform():
    rng = np.random.default_rng(5)
    full = ExpGradWeights(4, 2.0, smoothing=1.0)
    frozen = ExpGradWeights(4, 0.0)
    frozen_smoothed = ExpGradWeights(4, 0.0, smoothing=0.3)
    for _ in range(20):
        g = rng.normal(scale=10.0, size=4)
        np.testing.assert_allclose(full.update(g), 0.25, rtol=1e-13)
        np.testing.assert_allclose(frozen.update(g), 0.25, rtol=1e-13)
        np.testing.assert_allclose(frozen_smoothed.update(g), 0.25, rtol=1e-13)


def test_large_gains_do_not_overflow():
    eg = ExpGradWeights(3, 10.0)
    for _ in range(1000):
        eg.update(np.array([1e3, 0.0, 5e2]))
    w = eg.weights
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, [1.0, 0.0, 0.0], atol=1e-300)
    # the log-weights still carry the exact gaps, so a reversal of fortune is followed faithfully
    np.testing.assert_allclose(eg.log_weights[2] - eg.log_weights[1], 1000 * 10.0 * 5e2, rtol=1e-12)


def test_batched_runs_are_independent_of_each_others_smoothing():
    """BUG: ``update`` applies smoothing to every run as soon as one run has smoothing > 0, through
    log((1 - c) exp(log_w) + c / k). For a run with c = 0 this round trip underflows log-weights below
    about -745 to -inf, so that run loses the log-space weights an unbatched run keeps, and a task whose
    weight was driven that low can never come back. (A long convex-lab run reaches such gaps:
    eta_alpha * T * Bl = sqrt(8 T ln k) is about 850 for T = 2^16, k = 4.)"""
    single = ExpGradWeights(2, 1.0)
    batched = ExpGradWeights(2, 1.0, smoothing=[0.0, 0.01], batch_shape=(2,))
    for g in ([0.0, 1000.0], [2000.0, 0.0]):
        single.update(np.array(g))
        batched.update(np.array([g, g]))
        np.testing.assert_allclose(batched.log_weights[0], single.log_weights, rtol=1e-12)
        np.testing.assert_allclose(batched.weights[0], single.weights, rtol=1e-12)
    np.testing.assert_allclose(single.weights, [1.0, 0.0], atol=1e-300)


def test_state_round_trip_and_validation():
    eg = ExpGradWeights(3, 0.5, smoothing=0.01)
    rng = np.random.default_rng(6)
    for _ in range(5):
        eg.update(rng.normal(size=3))
    other = ExpGradWeights(3, 0.5, smoothing=0.01)
    other.load_state_dict(eg.state_dict())
    g = rng.normal(size=3)
    np.testing.assert_array_equal(other.update(g), eg.update(g))
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"log_weights": np.zeros(4)})
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({})


@pytest.mark.parametrize("kwargs,name", [
    ({"eta": -0.1}, "eta_alpha"),
    ({"eta": float("nan")}, "eta_alpha"),
    ({"eta": 1.0, "smoothing": -0.01}, "smoothing"),
    ({"eta": 1.0, "smoothing": 1.5}, "smoothing"),
])
def test_bad_parameters_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ExpGradWeights(3, **kwargs)
    with pytest.raises(ValueError, match=r"\bk\b"):
        ExpGradWeights(0, 1.0)
