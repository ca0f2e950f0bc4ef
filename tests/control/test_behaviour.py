"""Behaviour policies (amalab/control/behaviour.py) on a toy simulator with closed-form returns: the linear
policy's layout, the mean returns of a batch of candidates spread over fewer simulators than rollouts, and
CEM's levels (level 0 is the initial mean; later levels earn more).

The toy simulator (tests/control/conftest.py, no MuJoCo): a point on the plane moved by each action, the
reward after a step -|position - goal|^2. From x0 with the constant action c (W = 0, b = c) the return over
H steps is -sum_{t=1..H} |x0 + t c - goal|^2.

With ``normalize``, CEM searches over policies of the standardized observation and folds each back into a
policy of the raw observation: the fold is checked against the standardized policy itself, and CEM's result
against a simulator whose observations are measured from another origin (the same returns, where the raw
search's differ).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from amalab.control.behaviour import (BehaviourConfig, _returns, fold_standardization, linear_actions,
                                      train_behaviour)

TASK = SimpleNamespace(name="toy")


def test_linear_actions_are_w_o_plus_b_per_environment():
    rng = np.random.default_rng(0)
    n, a, d = 4, 3, 5
    W, b, o = rng.standard_normal((n, a, d)), rng.standard_normal((n, a)), rng.standard_normal((n, d))
    params = np.stack([np.hstack([W[j], b[j][:, None]]).ravel() for j in range(n)])  # W row-major, then b
    expected = np.array([[sum(W[j, i, k] * o[j, k] for k in range(d)) + b[j, i] for i in range(a)]
                         for j in range(n)])
    np.testing.assert_allclose(linear_actions(params, o, d), expected, rtol=1e-12, atol=1e-12)


def closed_form_return(toy, c, seed, horizon):
    t = np.arange(1, horizon + 1)[:, None]
    return -np.sum((toy.start(seed) + t * c - toy.GOAL) ** 2)


def test_mean_returns_of_candidates_over_seeds_in_batches_of_the_simulators(toy_simulators):
    constants = np.array([[0.5, -0.5], [1.0, 0.0], [-0.2, 0.3], [0.0, -1.0]])
    params = np.stack([np.concatenate([np.zeros(3), [c[0]], np.zeros(3), [c[1]]]) for c in constants])
    seeds, horizon = [7, 42], 6
    got = _returns(toy_simulators(3), params, TASK, seeds, horizon)  # 8 rollouts on 3 simulators: 3 + 3 + 2
    expected = [np.mean([closed_form_return(toy_simulators, c, s, horizon) for s in seeds])
                for c in constants]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_cem_levels_start_at_the_initial_mean_and_improve(toy_simulators):
    config = BehaviourConfig(population=16, iterations=8, horizon=10, levels=[0, 4, 8], init_std=0.5)
    policies, returns = train_behaviour(toy_simulators(8), TASK, config, seed=3, show_progress=False)
    assert policies.shape == (3, 2 * (3 + 1))
    assert not policies[0].any()  # level 0: the mean before any iteration
    assert returns[2] > returns[0] and returns[1] > returns[0]
    again, again_returns = train_behaviour(toy_simulators(8), TASK, config, seed=3, show_progress=False)
    np.testing.assert_array_equal(again, policies)
    np.testing.assert_array_equal(again_returns, returns)


def test_a_folded_policy_acts_on_raw_observations_as_the_standardized_one():
    rng = np.random.default_rng(1)
    m, a, d = 5, 3, 4
    params, obs = rng.standard_normal((m, a * (d + 1))), rng.standard_normal((m, d)) * 3 + 2
    mean, scale = rng.standard_normal(d), rng.uniform(0.1, 5.0, d)
    np.testing.assert_allclose(linear_actions(fold_standardization(params, mean, scale), obs, d),
                               linear_actions(params, (obs - mean) / scale, d), rtol=1e-12, atol=1e-12)


def shifted_toy(toy, shift):
    """The toy simulators observed from another origin: every observation is o + shift."""

    class Shifted(toy):
        def _obs(self, n):
            return super()._obs(n) + shift

    return Shifted


def test_normalized_cem_does_not_depend_on_the_observations_origin(toy_simulators):
    shift = np.array([40.0, -25.0, 60.0])
    for normalize in (True, False):
        config = BehaviourConfig(population=16, iterations=6, horizon=10, levels=[0, 3, 6], init_std=0.3,
                                 normalize=normalize)
        _, returns = train_behaviour(toy_simulators(8), TASK, config, seed=5, show_progress=False)
        _, moved = train_behaviour(shifted_toy(toy_simulators, shift)(8), TASK, config, seed=5,
                                   show_progress=False)
        if normalize:
            np.testing.assert_allclose(moved, returns, rtol=1e-9)
            assert returns[-1] > returns[0]
        else:  # the raw search's first candidates already act on the shift: W (o + shift) + b
            assert not np.allclose(moved, returns, rtol=1e-3)


@pytest.mark.parametrize("change, message", [
    ({"normalize": True, "noise": 0.0}, "normalize needs noise > 0"),
    ({"population": 1}, "population must be >= 2"),
    ({"elite": 0.0}, "elite must lie in (0, 1]"),
    ({"levels": [4]}, "levels must be >= 2 increasing iterations"),
    ({"levels": [4, 2]}, "levels must be >= 2 increasing iterations"),
    ({"levels": [0, 9]}, "levels must be >= 2 increasing iterations"),
    ({"init_std": 0.0}, "init_std > 0"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError) as raised:
        BehaviourConfig(**change).check()
    assert message in str(raised.value)
