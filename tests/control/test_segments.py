"""The segment pool (amalab/control/segments.py) on the toy simulator of tests/control/conftest.py (no
MuJoCo), whose observation carries the number of steps taken: every start's prefix has a length in
``prefix_steps``; the four continuations of a start begin in its one state; slots 0 and 1 of the poor kind
run level 0 and the better kind a level >= 1; every recorded action is the recorded level's linear policy of
the recorded observation (noise 0), the next observation is the toy's step from it and the reward its
closed form; starts are split over as many simulator batches as needed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from amalab.control.segments import KINDS, PoolConfig, simulate_pool

TASK = SimpleNamespace(name="toy")


def policy_params(W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(W, b) as the flat parameters of amalab.control.behaviour.linear_actions (W row-major, then b)."""
    return np.hstack([W, b[:, None]]).ravel()


def levels_of_policies(n_levels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(11)
    return np.stack([policy_params(0.1 * rng.standard_normal((2, 3)), rng.uniform(-0.8, 0.8, 2))
                     for _ in range(n_levels)])


@pytest.fixture(scope="module")
def pool(toy_simulators):
    config = PoolConfig(train_starts=5, eval_starts=2, segment_length=6, prefix_steps=[2, 4])
    policies = levels_of_policies()
    # 7 starts on 3 simulators: batches of 3, 3 and 1
    return config, policies, simulate_pool(toy_simulators(3), TASK, policies, 0.0, config, seed=5,
                                           show_progress=False)


def test_the_pool_has_every_start_and_kind(pool):
    config, _, arrays = pool
    starts, L = config.train_starts + config.eval_starts, config.segment_length
    assert arrays["observations"].shape == (starts, 4, L, 3) and arrays["actions"].shape == (starts, 4, L, 2)
    assert arrays["rewards"].shape == (starts, 4, L) and arrays["levels"].shape == (starts, 4)


def test_the_four_continuations_of_a_start_begin_after_its_prefix_in_one_state(pool, toy_simulators):
    config, _, arrays = pool
    first = arrays["observations"][:, :, 0]  # (starts, 4, d)
    for k in range(1, 4):
        np.testing.assert_array_equal(first[:, k], first[:, 0])
    prefix = first[:, 0, 2]  # the steps taken before the continuation
    assert np.all((prefix >= config.prefix_steps[0]) & (prefix <= config.prefix_steps[1]))
    steps = arrays["observations"][:, :, :, 2] - prefix[:, None, None]
    np.testing.assert_array_equal(steps, np.broadcast_to(np.arange(config.segment_length), steps.shape))


def test_poor_slots_run_level_zero_and_better_slots_a_better_level(pool):
    _, policies, arrays = pool
    levels = arrays["levels"]
    for kind, (slot, poor) in enumerate(KINDS):
        if poor:
            assert np.all(levels[:, kind] == 0), (slot, kind)
        else:
            assert np.all((levels[:, kind] >= 1) & (levels[:, kind] < len(policies))), (slot, kind)


def test_actions_rewards_and_next_observations_follow_the_recorded_policy(pool, toy_simulators):
    config, policies, arrays = pool
    obs, actions, rewards = arrays["observations"], arrays["actions"], arrays["rewards"]
    for s in range(len(obs)):
        for kind in range(4):
            W = policies[arrays["levels"][s, kind]].reshape(2, 4)  # (a, d + 1)
            for t in range(config.segment_length):
                o = obs[s, kind, t]
                np.testing.assert_allclose(actions[s, kind, t], W[:, :3] @ o + W[:, 3],
                                           rtol=1e-12, atol=1e-12)
                moved = o[:2] + np.clip(actions[s, kind, t], -1.0, 1.0)
                reward = -np.sum((moved - toy_simulators.GOAL) ** 2)
                assert rewards[s, kind, t] == pytest.approx(reward, rel=1e-12)
                if t + 1 < config.segment_length:
                    np.testing.assert_allclose(obs[s, kind, t + 1, :2], moved, rtol=1e-12, atol=1e-12)


def test_the_same_seed_gives_the_same_pool_and_noise_makes_the_slots_differ(toy_simulators):
    config = PoolConfig(train_starts=3, eval_starts=1, segment_length=4, prefix_steps=[1, 3])
    policies = levels_of_policies()

    def run(seed):
        return simulate_pool(toy_simulators(2), TASK, policies, 0.3, config, seed=seed, show_progress=False)

    a, b, other = run(1), run(1), run(2)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["actions"], other["actions"])
    # both poor continuations start in one state and run level 0, but with their own noise
    np.testing.assert_array_equal(a["observations"][:, 0, 0], a["observations"][:, 1, 0])
    assert not np.allclose(a["actions"][:, 0], a["actions"][:, 1])


@pytest.mark.parametrize("change, message", [
    ({"train_starts": 0}, "must be >= 1"),
    ({"segment_length": 0}, "must be >= 1"),
    ({"prefix_steps": [3, 2]}, "prefix_steps must be [min, max] with 0 <= min <= max, got [3, 2]"),
    ({"prefix_steps": [1]}, "prefix_steps must be [min, max]"),
])
def test_bad_pool_settings_are_refused(change, message):
    with pytest.raises(ValueError) as raised:
        PoolConfig(**change).check()
    assert message in str(raised.value)


def test_bodies_that_fall_end_their_segments_and_start_from_their_last_state_before_the_fall(toy_simulators):
    """With the toy's episodes terminating once x passes 1.0: a prefix that fell gives a start in the last
    state before the fall (steps taken below the prefix's minimum), every start is such a state, and a
    segment's actions after its ``length`` are zero while the state reached by its last action is past the
    line."""
    config = PoolConfig(train_starts=8, eval_starts=2, segment_length=6, prefix_steps=[2, 4])
    arrays = simulate_pool(toy_simulators(4, fall_at=1.0), TASK, levels_of_policies(), 0.0, config, seed=2,
                           show_progress=False)
    obs, actions, lengths = arrays["observations"], arrays["actions"], arrays["lengths"]
    assert lengths.shape == (10, 4) and lengths.min() >= 1 and lengths.max() <= config.segment_length
    start = obs[:, 0, 0]
    assert np.all(start[:, 0] <= 1.0), "a start is a state before any fall"
    assert np.any(start[:, 2] < config.prefix_steps[0]), "the test needs prefixes that fell"
    ended = lengths < config.segment_length
    assert ended.any() and (~ended).any()
    for s, kind in zip(*np.nonzero(ended)):
        n = lengths[s, kind]
        assert not actions[s, kind, n:].any()
        assert np.all(obs[s, kind, :n, 0] <= 1.0) and obs[s, kind, n, 0] > 1.0
