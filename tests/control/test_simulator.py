"""Episodes that end, body layouts and MuJoCo's compile warnings, against gymnasium's own environments."""

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")
mujoco = pytest.importorskip("mujoco")

from amalab.control.simulator import Simulators, make_environment  # noqa: E402
from amalab.control.tasks import BodyLayout, TaskSpec  # noqa: E402
from amalab.errors import ConfigError  # noqa: E402

HOP = TaskSpec("hop", velocity=1.0, height_weight=0.5, control_weight=0.01, alive_weight=1.0)


def test_hopper_episodes_end_where_gymnasium_says_terminated():
    """Each environment stops at the step whose ``terminated`` gymnasium reports (a wrapped environment
    stepped on its own with the same clipped actions), earns the task's reward with the alive term up to it
    and the absorbing reward after it, records no action after it, and is not stepped again."""
    steps, n, seeds = 120, 4, [3, 4, 5, 6]
    actions = np.random.default_rng(0).normal(0, 1.5, (steps, n, 3))
    sims = Simulators("Hopper-v5", n)
    done = sims.rollout(sims.reset(seeds), lambda o, t: actions[t], steps, [HOP] * n)
    assert (done.lengths < steps).sum() >= 2, "the test needs episodes that end"
    for j, seed in enumerate(seeds):
        env = gymnasium.make("Hopper-v5", max_episode_steps=10_000)
        observation, _ = env.reset(seed=seed)
        data, ended = env.unwrapped.data, steps
        for t in range(steps):
            np.testing.assert_allclose(done.observations[j, t], observation, rtol=0, atol=0)
            observation, _, terminated, _, _ = env.step(np.clip(actions[t, j], -1, 1))
            alive = 0.0 if terminated else 1.0
            expected = (-abs(data.qvel[0] - 1.0) + 0.5 * data.qpos[1] - 0.01 * float(data.ctrl @ data.ctrl) + alive)
            assert done.rewards[j, t] == pytest.approx(expected, rel=1e-12, abs=1e-12)
            if terminated:
                ended = t + 1
                break
        assert done.lengths[j] == ended
        np.testing.assert_array_equal(done.actions[j, :ended], actions[:ended, j])
        assert not done.actions[j, ended:].any()
        absorbing = -1.0 + 0.5 * data.qpos[1]  # lying still where it fell: no velocity, control or alive term
        np.testing.assert_allclose(done.rewards[j, ended:], absorbing, rtol=1e-12)
        np.testing.assert_array_equal(done.observations[j, ended:], np.broadcast_to(observation, (steps - ended, 11)))
        assert sims.envs[j].data.time == pytest.approx(data.time)  # not stepped after the end


def test_halfcheetah_never_terminates():
    sims = Simulators("HalfCheetah-v5", 2)
    actions = np.random.default_rng(1).normal(0, 2.0, (60, 2, 6))
    done = sims.rollout(sims.reset([0, 1]), lambda o, t: actions[t], 60, [HOP] * 2)
    assert done.lengths.tolist() == [60, 60]


@pytest.mark.parametrize("name, height", [("HalfCheetah-v5", 1), ("Hopper-v5", 1), ("Walker2d-v5", 1),
                                          ("Ant-v5", 2)])
def test_body_layout_finds_the_root_height(name, height):
    env = make_environment(name)
    assert BodyLayout.of(env.model).height == height
    env.reset(seed=0)
    root = env.data.qpos[height]  # the root's z: the body's own initial height, well above the floor
    assert root == pytest.approx(env.init_qpos[height], abs=0.2) and (name == "HalfCheetah-v5" or root > 0.5)


def test_a_body_without_forward_velocity_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="free joint or slides along x then z or y"):
        Simulators("Reacher-v5", 1)  # an arm on hinges: no root that moves


def test_a_swimmer_has_no_height_and_a_task_that_weighs_one_is_refused():
    sims = Simulators("Swimmer-v5", 2)  # slides along x then y, in the horizontal plane
    assert sims.layout.height is None
    swim = TaskSpec("swim", velocity=0.2, control_weight=0.1)
    actions = np.random.default_rng(0).uniform(-1, 1, (30, 2, 2))
    done = sims.rollout(sims.reset([0, 1]), lambda o, t: actions[t], 30, [swim] * 2, record_states=True)
    # the reward after each step, from the next step's recorded state: velocity and control, no height
    expected = -np.abs(done.qvel[:, 1:, 0] - 0.2) - 0.1 * np.sum(np.clip(actions[:-1], -1, 1) ** 2, axis=-1).T
    np.testing.assert_allclose(done.rewards[:, :-1], expected, rtol=1e-12)
    with pytest.raises(ConfigError, match="task 'dive': height_weight needs a body with a height"):
        sims.layout.check([swim, TaskSpec("dive", velocity=0.0, height_weight=1.0)])


def test_environment_options_reach_gymnasium_and_a_wrong_one_is_one_line():
    assert Simulators("Ant-v5", 1).observation_size == 105  # with the contact forces
    lean = Simulators("Ant-v5", 1, {"include_cfrc_ext_in_observation": False})
    assert lean.observation_size == 27 == gymnasium.make("Ant-v5", include_cfrc_ext_in_observation=False
                                                         ).observation_space.shape[0]
    with pytest.raises(ConfigError, match="environment 'Ant-v5', environment_options .*no_such_option"):
        Simulators("Ant-v5", 1, {"no_such_option": 1})


def test_compile_deprecation_warnings_are_dropped_and_other_warnings_kept(capfd):
    make_environment("HalfCheetah-v5")  # its model file uses the deprecated settotalmass
    assert "settotalmass" not in capfd.readouterr().err
    seen = []
    mujoco.set_mju_user_warning(seen.append)
    try:
        env = make_environment("HalfCheetah-v5")
        assert seen == [] and mujoco.get_mju_user_warning() is not None  # the caller's handler is back
        env.data.ctrl[:] = np.nan  # a runtime warning still reaches it
        mujoco.mj_step(env.model, env.data)
        assert len(seen) == 1 and "CTRL" in seen[0]
    finally:
        mujoco.set_mju_user_warning(None)


@pytest.mark.parametrize("name", ["HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Swimmer-v5",
                                  "Humanoid-v5", "HumanoidStandup-v5"])
def test_physics_step_is_gymnasiums_step_bit_for_bit(name):
    """The step without gymnasium's reward (what every rollout of these bodies takes) reaches the same state,
    observation, post-constraint forces and ``terminated`` as ``env.step``, through falls and resets."""
    from amalab.control.simulator import Simulators, physics_step

    sims = Simulators(name, 2)
    assert sims.step is physics_step
    ours, theirs = sims.envs
    rng, ended = np.random.default_rng(0), 0
    ours.reset(seed=5), theirs.reset(seed=5)
    for t in range(150):
        action = np.clip(rng.normal(0, 1.5, sims.action_size), sims.low, sims.high)
        observation, terminated = physics_step(ours, action)
        expected, _, expected_terminated, _, _ = theirs.step(action)
        np.testing.assert_array_equal(observation, expected)
        assert terminated == expected_terminated
        for field in ("qpos", "qvel", "qacc_warmstart", "cfrc_ext", "time"):
            np.testing.assert_array_equal(getattr(ours.data, field), getattr(theirs.data, field))
        if terminated:
            ended += 1
            ours.reset(seed=t), theirs.reset(seed=t)
    # the bodies that fall do so several times under these actions; the others never end an episode
    assert ended >= 2 if name in ("Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5") else ended == 0


def test_another_version_of_a_body_is_stepped_by_gymnasium():
    from amalab.control.simulator import Simulators, gymnasium_step

    assert Simulators("Hopper-v4", 1).step is gymnasium_step
