"""Task rewards recomputed from the simulator's state, on an environment stepped independently of the suite."""

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from amalab.control.simulator import Simulators  # noqa: E402
from amalab.control.tasks import GOAL_SIZE, TaskSpec, with_goal  # noqa: E402

TASKS = [TaskSpec("forward", velocity=2.0), TaskSpec("backward", velocity=-1.0, velocity_weight=0.5),
         TaskSpec("jump", velocity_weight=0.0, height_weight=10.0, control_weight=0.1)]


def test_rewards_recomputed_from_simulator_state():
    steps, seed = 30, 7
    actions = np.random.default_rng(0).normal(0, 0.8, (steps, 6))  # some beyond the box: clipped when stepped
    sims = Simulators("HalfCheetah-v5", len(TASKS))
    obs = sims.reset([seed] * len(TASKS))
    done = sims.rollout(obs, lambda o, t: np.repeat(actions[t][None], len(o), 0), steps, TASKS)
    np.testing.assert_array_equal(done.actions[0], actions)  # recorded as taken, not clipped

    env = gymnasium.make("HalfCheetah-v5")
    env.reset(seed=seed)
    data = env.unwrapped.data
    for t in range(steps):
        _, _, _, _, info = env.step(np.clip(actions[t], -1, 1))
        vx, height, ctrl = data.qvel[0], data.qpos[1], np.array(data.ctrl)
        expected = [-abs(vx - 2.0), -0.5 * abs(vx + 1.0), 10.0 * height - 0.1 * float(ctrl @ ctrl)]
        np.testing.assert_allclose(done.rewards[:, t], expected, rtol=1e-12, atol=1e-12)
        # the energy term is gymnasium's own control cost (weight 0.1 in HalfCheetah-v5)
        assert -0.1 * float(ctrl @ ctrl) == pytest.approx(info["reward_ctrl"], rel=1e-12, abs=1e-12)


def test_goal_is_appended_to_every_observation():
    obs = np.arange(2 * 3 * 17, dtype=float).reshape(2, 3, 17)
    out = with_goal(obs, TASKS[0])
    assert out.shape == (2, 3, 17 + GOAL_SIZE)
    np.testing.assert_array_equal(out[..., :17], obs)
    np.testing.assert_array_equal(out[1, 2, 17:], [2.0, 1.0, 0.0, 0.0, 0.0])
    assert len({tuple(t.goal) for t in TASKS}) == len(TASKS)
