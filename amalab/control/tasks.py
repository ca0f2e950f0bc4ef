"""Tasks of one MuJoCo environment: each a reward function of the simulator state, its goal in the observation.

A task's reward after a step is a pure function of the state the step reached and the control it applied,

    r(qpos, qvel, ctrl) = - velocity_weight * |v_x - velocity| + height_weight * z
                          - control_weight * ||ctrl||^2 + alive_weight * [the episode goes on],

with v_x the root's forward velocity (qvel[0]) and z the root's height: qpos[1] for the planar bodies
(HalfCheetah, Hopper, Walker2d: slide x, slide z, hinge first), qpos[2] for a free root (Ant: x, y, z,
quaternion), none for a body that swims in the horizontal plane (Swimmer: slide x, slide y), whose tasks
cannot weigh a height; :class:`BodyLayout` reads which from the model. Target velocities, running backward, torso
height, energy use and staying up (gymnasium's ``healthy_reward``, for bodies that can fall) are settings of
the same four terms. After an episode terminates, each remaining step earns the absorbing reward
(docs/maths.md section 13): the body lies still where it fell, no velocity, no control, not alive.

The policy's observation is the environment's own observation followed by the task's goal vector
(velocity_weight * velocity, velocity_weight, height_weight, control_weight, alive_weight), so that one
policy serves every task, as one language model serves every prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amalab.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    """One task: a name and the weights of its reward terms (module docstring)."""

    name: str
    velocity: float = 0.0
    velocity_weight: float = 1.0
    height_weight: float = 0.0
    control_weight: float = 0.0
    alive_weight: float = 0.0

    def check(self) -> None:
        for name in ("velocity_weight", "height_weight", "control_weight", "alive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.velocity_weight or self.height_weight or self.control_weight):
            raise ValueError(f"task {self.name!r} has every state reward weight 0 (velocity, height, control)")

    @property
    def goal(self) -> np.ndarray:
        """The task's goal vector, appended to every observation."""
        return np.array([self.velocity_weight * self.velocity, self.velocity_weight, self.height_weight,
                         self.control_weight, self.alive_weight])


GOAL_SIZE = 5


def stacked(tasks: list[TaskSpec]) -> TaskSpec:
    """One :class:`TaskSpec` whose weights are arrays (n,), row j those of ``tasks[j]``: :func:`task_reward`
    and :func:`absorbing_reward` take it as they take one task and score n environments at once."""
    fields = ("velocity", "velocity_weight", "height_weight", "control_weight", "alive_weight")
    return TaskSpec("stacked", **{f: np.array([getattr(t, f) for t in tasks], dtype=float) for f in fields})


@dataclass(frozen=True)
class BodyLayout:
    """Where a body's root height lies in qpos (its forward velocity is qvel[0] in every supported body);
    ``height`` None: a body that moves in the horizontal plane and has none."""

    height: int | None

    @staticmethod
    def of(model) -> BodyLayout:
        """The layout of a compiled MuJoCo model: a free root joint (x, y, z, quaternion), a planar root
        (slide x, slide z, ...) or a horizontal one (slide x, slide y, ...); any other body is refused in one
        line."""
        import mujoco

        kinds, axes = model.jnt_type, model.jnt_axis
        if len(kinds) and kinds[0] == mujoco.mjtJoint.mjJNT_FREE:
            return BodyLayout(height=2)
        if (len(kinds) >= 2 and kinds[0] == kinds[1] == mujoco.mjtJoint.mjJNT_SLIDE
                and np.allclose(axes[0], [1, 0, 0])):
            if np.allclose(axes[1], [0, 0, 1]):  # planar: the second slide is the height
                return BodyLayout(height=1)
            if np.allclose(axes[1], [0, 1, 0]):  # horizontal: no height
                return BodyLayout(height=None)
        raise ConfigError("the tasks need a body whose root is a free joint or slides along x then z or y "
                          "(forward velocity, and height where it has one); this model's first joints are none "
                          "of these")

    def check(self, tasks: list[TaskSpec]) -> None:
        """A body without a height cannot score a task that weighs one: refused in one line."""
        weighing = [t.name for t in tasks if t.height_weight]
        if self.height is None and weighing:
            raise ConfigError(f"task {weighing[0]!r}: height_weight needs a body with a height, and this one moves "
                              "in the horizontal plane (slides along x and y)")

    def height_of(self, qpos: np.ndarray) -> np.ndarray | float:
        """The root's height in states (..., nq) (0 for a body without one, whose tasks weigh none)."""
        return 0.0 if self.height is None else qpos[..., self.height]


#: HalfCheetah's and Hopper's layout, for callers that build states by hand
PLANAR = BodyLayout(height=1)


def task_reward(task: TaskSpec, qpos: np.ndarray, qvel: np.ndarray, ctrl: np.ndarray,
                layout: BodyLayout = PLANAR, alive: bool | np.ndarray = True) -> np.ndarray:
    """The reward of ``task`` in states (..., nq), (..., nv) after controls (..., nu); shape (...).
    ``alive``: the step did not terminate the episode (the alive term is earned)."""
    return (-task.velocity_weight * np.abs(qvel[..., 0] - task.velocity)
            + task.height_weight * layout.height_of(qpos)
            - task.control_weight * np.sum(np.square(ctrl), axis=-1) + task.alive_weight * np.asarray(alive))


def absorbing_reward(task: TaskSpec, qpos: np.ndarray, layout: BodyLayout = PLANAR) -> np.ndarray:
    """The reward of each step after termination: the body at rest in its last state ``qpos``, no control,
    no alive term (docs/maths.md section 13)."""
    return (-task.velocity_weight * np.abs(task.velocity) + task.height_weight * layout.height_of(qpos))


def with_goal(observations: np.ndarray, task: TaskSpec) -> np.ndarray:
    """Observations (..., d) followed by the task's goal: the policy's input (..., d + GOAL_SIZE)."""
    goal = np.broadcast_to(task.goal, observations.shape[:-1] + (GOAL_SIZE,))
    return np.concatenate([observations, goal], axis=-1)
