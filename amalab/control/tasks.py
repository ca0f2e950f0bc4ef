"""Tasks of one MuJoCo environment: each a reward function of the simulator state, its goal in the observation.

A task's reward after a step is a pure function of the state the step reached and the control it applied,

    r(qpos, qvel, ctrl) = - velocity_weight * |qvel[0] - velocity| + height_weight * qpos[1]
                          - control_weight * ||ctrl||^2,

with qvel[0] the root's forward velocity and qpos[1] the root's height (HalfCheetah's and Hopper's layout:
slide x, slide z first). Target velocities, running backward, torso height and energy use are settings of
the same three terms. The policy's observation is the environment's own observation followed by the task's
goal vector (velocity_weight * velocity, velocity_weight, height_weight, control_weight), so that one policy
serves every task, as one language model serves every prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """One task: a name and the weights of its reward terms (module docstring)."""

    name: str
    velocity: float = 0.0
    velocity_weight: float = 1.0
    height_weight: float = 0.0
    control_weight: float = 0.0

    def check(self) -> None:
        for name in ("velocity_weight", "height_weight", "control_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.velocity_weight or self.height_weight or self.control_weight):
            raise ValueError(f"task {self.name!r} has every reward weight 0")

    @property
    def goal(self) -> np.ndarray:
        """The task's goal vector, appended to every observation."""
        return np.array([self.velocity_weight * self.velocity, self.velocity_weight, self.height_weight,
                         self.control_weight])


GOAL_SIZE = 4


def task_reward(task: TaskSpec, qpos: np.ndarray, qvel: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """The reward of ``task`` in states (..., nq), (..., nv) after controls (..., nu); shape (...)."""
    return (-task.velocity_weight * np.abs(qvel[..., 0] - task.velocity) + task.height_weight * qpos[..., 1]
            - task.control_weight * np.sum(np.square(ctrl), axis=-1))


def with_goal(observations: np.ndarray, task: TaskSpec) -> np.ndarray:
    """Observations (..., d) followed by the task's goal: the policy's input (..., d + GOAL_SIZE)."""
    goal = np.broadcast_to(task.goal, observations.shape[:-1] + (GOAL_SIZE,))
    return np.concatenate([observations, goal], axis=-1)
