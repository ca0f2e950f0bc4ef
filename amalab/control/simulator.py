"""A batch of gymnasium MuJoCo environments stepped together, with the task rewards of each step.

Actions are recorded as the policy took them and clipped to the action box only when the simulator is
stepped, so the log-density of a recorded action is the exact density of what was drawn (docs/maths.md
section 9, with actions for tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from amalab.control.tasks import TaskSpec, task_reward
from amalab.errors import ConfigError


def make_environment(name: str):
    """The unwrapped environment: the suite handles horizons itself, so no time limit or checker wrapper."""
    try:
        import gymnasium
    except ImportError as e:
        raise ConfigError(f"the MuJoCo suite needs the mujoco extra ({e}): pip install -e '.[mujoco]'") from None
    try:
        return gymnasium.make(name).unwrapped
    except gymnasium.error.Error as e:
        raise ConfigError(f"environment {name!r}: {e}") from None


@dataclass
class Trajectories:
    """What a batch rollout recorded: observations before each action, actions as taken, task rewards."""

    observations: np.ndarray  # (n, T, d)
    actions: np.ndarray  # (n, T, a)
    rewards: np.ndarray  # (n, T)


class Simulators:
    """``n`` copies of one environment, stepped in lockstep."""

    def __init__(self, name: str, n: int):
        self.envs = [make_environment(name) for _ in range(n)]
        space = self.envs[0].action_space
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.observation_size = self.envs[0].observation_space.shape[0]
        self.action_size = space.shape[0]

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Reset the first len(seeds) environments with these seeds; their observations (len(seeds), d)."""
        return np.stack([env.reset(seed=int(s))[0] for env, s in zip(self.envs, seeds)])

    def states(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(qpos, qvel) of the first ``n`` environments."""
        return (np.stack([env.data.qpos.copy() for env in self.envs[:n]]),
                np.stack([env.data.qvel.copy() for env in self.envs[:n]]))

    def set_states(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Put the first len(qpos) environments into these states; their observations."""
        for env, p, v in zip(self.envs, qpos, qvel):
            env.set_state(p, v)
        return np.stack([env._get_obs() for env in self.envs[:len(qpos)]])

    def rollout(self, observations: np.ndarray, act: Callable[[np.ndarray, int], np.ndarray], steps: int,
                tasks: Sequence[TaskSpec]) -> Trajectories:
        """Step the first len(observations) environments ``steps`` times from their current states.

        ``act(observations, t)`` returns the actions (n, a) at step t; environment j earns ``tasks[j]``'s reward.
        """
        n = len(observations)
        obs = np.empty((n, steps, self.observation_size))
        actions = np.empty((n, steps, self.action_size))
        rewards = np.empty((n, steps))
        for t in range(steps):
            obs[:, t] = observations
            actions[:, t] = act(observations, t)
            clipped = np.clip(actions[:, t], self.low, self.high)
            stepped = []
            for j, env in enumerate(self.envs[:n]):
                stepped.append(env.step(clipped[j])[0])
                rewards[j, t] = task_reward(tasks[j], env.data.qpos, env.data.qvel, env.data.ctrl)
            observations = np.stack(stepped)
        return Trajectories(obs, actions, rewards)
