"""The MuJoCo suite's tests share one tiny diagnostic config (every method, merge and sweep in seconds) and a
toy simulator with closed-form dynamics (no MuJoCo) for the behaviour and segment tests."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

TINY = """
out = "{out}"
figures = "{figures}"
simulators = 8

[[tasks]]
name = "forward"
velocity = 2.0

[[tasks]]
name = "still"
velocity_weight = 0.0
control_weight = 1.0

[behaviour]
population = 6
iterations = 2
horizon = 15
levels = [0, 2]
init_std = 0.1

[pool]
train_starts = 12
eval_starts = 6
segment_length = 8
prefix_steps = [2, 4]

[loss]
loss_type = "apo_zero"
beta = 0.1

[policy]
hidden = [16]

[reference]
max_steps = 8
batch_size = 16
learning_rate = 3e-3

[specialists]
max_steps = 40
batch_size = 8
learning_rate = 3e-3

[train]
max_steps = 3
batch_size = 8
learning_rate = 1e-3

[methods]
names = ["standard", "uniform", "doremi", "odm", "ama-r", "ama-r-sim", "ama-s", "sft"]
seeds = 6

[merges]
names = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
options = {{ ties = {{ density = 0.5 }}, dare_linear = {{ drop = 0.3 }}, dare_ties = {{ drop = 0.3 }} }}

[evaluation]
episodes = 4
horizon = 10

[sweeps]
imbalance = [1, 3]
mistake = [0.0, 0.3]
poor_share = [0.2]
losses = ["dpo", "ipo", "robust"]
label_smoothing = 0.2
methods = ["standard", "ama-r"]
merges = ["linear"]
seeds = 2
"""


@pytest.fixture
def make_tiny_config(tmp_path):
    """A factory: ``edit(TINY)`` (TINY unchanged by default) written to ``tmp_path/tiny.toml``, its outputs in
    ``tmp_path/out`` and ``tmp_path/figures``; returns the path."""
    def make(edit=lambda text: text) -> Path:
        path = tmp_path / "tiny.toml"
        path.write_text(edit(TINY).format(out=tmp_path / "out", figures=tmp_path / "figures"))
        return path

    return make


@pytest.fixture
def tiny_config(make_tiny_config) -> Path:
    """The tiny config's path, its outputs under ``tmp_path``."""
    return make_tiny_config()


class ToySimulators:
    """Stands in for amalab.control.simulator.Simulators (the same methods) without MuJoCo: a point on the
    plane, observation (x, y, steps taken); an action moves the point by itself, clipped to [-1, 1]; the
    reward after a step is -|position - goal|^2. Reset with seed s starts at :meth:`start` (s)."""

    observation_size, action_size = 3, 2
    GOAL = np.array([3.0, -2.0])

    def __init__(self, n: int, fall_at: float | None = None):
        self.fall_at = fall_at
        self.envs = [SimpleNamespace(data=SimpleNamespace(qpos=np.zeros(2), qvel=np.zeros(1)))
                     for _ in range(n)]

    @staticmethod
    def start(seed: int) -> np.ndarray:
        return np.array([0.01 * (seed % 100), 0.0])

    def _obs(self, n):
        return np.stack([np.concatenate([e.data.qpos, e.data.qvel]) for e in self.envs[:n]])

    def reset(self, seeds):
        for env, s in zip(self.envs, seeds):
            env.data.qpos, env.data.qvel = self.start(int(s)), np.zeros(1)
        return self._obs(len(seeds))

    def set_states(self, qpos, qvel):
        for env, p, v in zip(self.envs, qpos, qvel):
            env.data.qpos, env.data.qvel = p.copy(), v.copy()
        return self._obs(len(qpos))

    def rollout(self, observations, act, steps, tasks, record_states=False):
        """As Simulators.rollout; the episode terminates at the step that takes x past ``fall_at`` (None:
        never), and after it each step earns 0 (a stand-in absorbing reward)."""
        from amalab.control.simulator import Trajectories

        n = len(observations)
        obs, actions, rewards = np.empty((n, steps, 3)), np.zeros((n, steps, 2)), np.empty((n, steps))
        qpos, qvel, lengths = np.empty((n, steps, 2)), np.empty((n, steps, 1)), np.full(n, steps)
        for t in range(steps):
            obs[:, t] = observations
            wanted = act(observations, t)
            for j, env in enumerate(self.envs[:n]):
                qpos[j, t], qvel[j, t] = env.data.qpos, env.data.qvel
                if lengths[j] < steps:
                    rewards[j, t] = 0.0
                    continue
                actions[j, t] = wanted[j]
                env.data.qpos = env.data.qpos + np.clip(actions[j, t], -1.0, 1.0)
                env.data.qvel = env.data.qvel + 1.0
                rewards[j, t] = -np.sum((env.data.qpos - self.GOAL) ** 2)
                if self.fall_at is not None and env.data.qpos[0] > self.fall_at:
                    lengths[j] = t + 1
            observations = self._obs(n)
        return Trajectories(obs, actions, rewards, lengths, *((qpos, qvel) if record_states else (None, None)))


@pytest.fixture(scope="session")
def toy_simulators():
    """The :class:`ToySimulators` class: ``toy_simulators(n)`` is n toy environments."""
    return ToySimulators
