"""A batch of gymnasium MuJoCo environments stepped together, with the task rewards of each step.

Actions are recorded as the policy took them and clipped to the action box only when the simulator is
stepped, so the log-density of a recorded action is the exact density of what was drawn (docs/maths.md
section 9, with actions for tokens).

Episodes end (docs/maths.md section 13): an environment whose step reports gymnasium's ``terminated`` (a
Hopper or an Ant that fell) is never stepped again in that rollout. Its trajectory keeps the rollout's
shape: the steps after the terminating one repeat the last observation, record zero actions (no action was
taken; ``lengths`` says how many were) and earn the task's absorbing reward, the reward of the body lying
still where it fell (:func:`~amalab.control.tasks.absorbing_reward`), so returns of episodes that ended and
of episodes that did not are sums over the same number of steps.

A step of the locomotion bodies is gymnasium's own physics without gymnasium's reward and info, which the
tasks replace (:func:`physics_step`): the same state, observation and ``terminated``, bit for bit, in about
four fifths of the time (Hopper's ``is_healthy`` is evaluated once instead of twice).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from amalab.control.tasks import BodyLayout, TaskSpec, absorbing_reward, stacked, task_reward
from amalab.errors import ConfigError

#: the compiler warnings of gymnasium's model files (HalfCheetah's ``settotalmass``), dropped while a model
#: compiles; every other MuJoCo warning reaches the handler that was installed before
_COMPILER_DEPRECATION = "compiler attribute"


def make_environment(name: str, options: dict | None = None):
    """The unwrapped environment, built with the keyword arguments ``options`` (gymnasium's own, e.g. Ant's
    ``include_cfrc_ext_in_observation``): the suite handles horizons and terminations itself, so no time limit
    or checker wrapper. MuJoCo's deprecation warnings about the model file are dropped while it compiles."""
    try:
        import gymnasium
        import mujoco
    except ImportError as e:
        raise ConfigError(f"the MuJoCo suite needs the mujoco extra ({e}): pip install -e '.[mujoco]'") from None
    previous = mujoco.get_mju_user_warning()

    def forward(message: str) -> None:
        if message.startswith(_COMPILER_DEPRECATION) and "deprecated" in message:
            return
        if previous is not None:
            previous(message)
        else:  # MuJoCo's own default: the message on stderr
            print(f"WARNING: {message}\n", file=sys.stderr)

    mujoco.set_mju_user_warning(forward)
    try:
        return gymnasium.make(name, **(options or {})).unwrapped
    except gymnasium.error.Error as e:
        raise ConfigError(f"environment {name!r}: {e}") from None
    except TypeError as e:  # an option the environment does not take
        raise ConfigError(f"environment {name!r}, environment_options {options}: {e}") from None
    finally:
        mujoco.set_mju_user_warning(previous)


def _locomotion_classes() -> tuple[type, ...]:
    """gymnasium's v5 bodies whose ``step`` is :func:`physics_step` plus a reward and an info dict."""
    from gymnasium.envs.mujoco import (ant_v5, half_cheetah_v5, hopper_v5, humanoid_v5, humanoidstandup_v5,
                                       swimmer_v5, walker2d_v5)

    return (ant_v5.AntEnv, half_cheetah_v5.HalfCheetahEnv, hopper_v5.HopperEnv, humanoid_v5.HumanoidEnv,
            humanoidstandup_v5.HumanoidStandupEnv, swimmer_v5.SwimmerEnv, walker2d_v5.Walker2dEnv)


def physics_step(env, action: np.ndarray) -> tuple[np.ndarray, bool]:
    """(observation, terminated) of ``env.step(action)`` for a body of :func:`_locomotion_classes`: its
    simulation (MuJoCo's step ``frame_skip`` times, then the post-constraint forces some observations read),
    its observation, and its termination rule (unhealthy, for the bodies that can fall and are set to end
    then; never, for the others), without the reward and info that the tasks replace."""
    import mujoco

    env.data.ctrl[:] = action
    mujoco.mj_step(env.model, env.data, nstep=env.frame_skip)
    mujoco.mj_rnePostConstraint(env.model, env.data)
    terminated = bool(getattr(env, "_terminate_when_unhealthy", False)) and not env.is_healthy
    return env._get_obs(), terminated


def gymnasium_step(env, action: np.ndarray) -> tuple[np.ndarray, bool]:
    """(observation, terminated) of ``env.step(action)``, for any environment."""
    observation, _, terminated, _, _ = env.step(action)
    return observation, terminated


@dataclass
class Trajectories:
    """What a batch rollout recorded: observations before each action, actions as taken, task rewards, and
    how many actions each environment took before its episode terminated (T if it did not)."""

    observations: np.ndarray  # (n, T, d)
    actions: np.ndarray  # (n, T, a), zero after termination
    rewards: np.ndarray  # (n, T), the absorbing reward after termination
    lengths: np.ndarray  # (n,) int
    qpos: np.ndarray | None = None  # (n, T, nq): the state each observation was taken in (record_states)
    qvel: np.ndarray | None = None  # (n, T, nv)


class Simulators:
    """``n`` copies of one environment, stepped in lockstep."""

    def __init__(self, name: str, n: int, options: dict | None = None):
        self.envs = [make_environment(name, options) for _ in range(n)]
        space = self.envs[0].action_space
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.observation_size = self.envs[0].observation_space.shape[0]
        self.action_size = space.shape[0]
        self.layout = BodyLayout.of(self.envs[0].model)
        self.step = physics_step if isinstance(self.envs[0], _locomotion_classes()) else gymnasium_step

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Reset the first len(seeds) environments with these seeds; their observations (len(seeds), d)."""
        return np.stack([env.reset(seed=int(s))[0] for env, s in zip(self.envs, seeds)])

    def set_states(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Put the first len(qpos) environments into these states; their observations."""
        for env, p, v in zip(self.envs, qpos, qvel):
            env.set_state(p, v)
        return np.stack([env._get_obs() for env in self.envs[:len(qpos)]])

    def rollout(self, observations: np.ndarray, act: Callable[[np.ndarray, int], np.ndarray], steps: int,
                tasks: Sequence[TaskSpec], record_states: bool = False) -> Trajectories:
        """Step the first len(observations) environments ``steps`` times from their current states, each until
        its episode terminates (module docstring).

        ``act(observations, t)`` returns the actions (n, a) at step t (every row is asked for, so its random
        draws do not depend on which episodes ended); environment j earns ``tasks[j]``'s reward.
        """
        n = len(observations)
        obs = np.empty((n, steps, self.observation_size))
        actions = np.zeros((n, steps, self.action_size))
        rewards = np.empty((n, steps))
        lengths = np.full(n, steps)
        qpos = np.empty((n, steps, self.envs[0].model.nq)) if record_states else None
        qvel = np.empty((n, steps, self.envs[0].model.nv)) if record_states else None
        envs, task = self.envs[:n], stacked(tasks[:n])
        for t in range(steps):
            obs[:, t] = observations
            wanted = act(observations, t)
            running = lengths == steps
            actions[running, t] = wanted[running]
            clipped = np.clip(wanted, self.low, self.high)
            stepped = []
            for j, env in enumerate(envs):
                if record_states:
                    qpos[j, t], qvel[j, t] = env.data.qpos, env.data.qvel
                if not running[j]:
                    stepped.append(observations[j])
                    continue
                observation, terminated = self.step(env, clipped[j])
                stepped.append(observation)
                if terminated:
                    lengths[j] = t + 1
            observations = np.stack(stepped)
            positions = np.stack([env.data.qpos for env in envs])
            earned = task_reward(task, positions, np.stack([env.data.qvel for env in envs]),
                                 np.stack([env.data.ctrl for env in envs]), self.layout, alive=lengths == steps)
            rewards[:, t] = np.where(running, earned, absorbing_reward(task, positions, self.layout))
        return Trajectories(obs, actions, rewards, lengths, qpos, qvel)


@contextmanager
def resets_nudged_by_one_ulp() -> Iterator[None]:
    """Within it, every reset state of this process's :class:`Simulators` is one ulp larger in each position
    coordinate: the size of a float difference another machine might make (the one-ulp check of
    docs/maths.md (65)). This process only: runs checked this way use one worker."""
    real = Simulators.reset

    def nudged(self, seeds):
        real(self, seeds)
        for env in self.envs[:len(seeds)]:
            env.set_state(np.nextafter(env.data.qpos, np.inf), env.data.qvel.copy())
        return np.stack([env._get_obs() for env in self.envs[:len(seeds)]])

    Simulators.reset = nudged
    try:
        yield
    finally:
        Simulators.reset = real
