"""True per-task returns by rollouts on fixed evaluation seeds, normalized per task.

A policy is rolled out with its mean action for ``horizon`` steps from ``episodes`` reset seeds per task
(the same seeds for every model of one training seed, new seeds for each training seed), earning the
task's reward; its return on task i is the mean over those episodes. Normalized per task (docs/maths.md
(61)), (R_i - R_i(ref)) / gain_i with R_i(ref) the reference's return on the same episodes and gain_i the
specialists' mean gain over it: 0 is the reference (the behaviour-cloned policy), 1 the task's specialist.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amalab.control.policy import GaussianMLP
from amalab.control.simulator import Simulators
from amalab.control.tasks import TaskSpec, with_goal


@dataclass(frozen=True)
class EvaluationConfig:
    episodes: int = 4
    horizon: int = 100
    seed: int = 12345  # the evaluation reset seeds are drawn from it: the same for every policy
    #: a task has a scale only if its specialists' gain over the reference is at least this fraction of the
    #: reference's |return| (docs/maths.md (62a)): a tiny gain, even a sure one, would blow every difference up
    min_gain: float = 0.05

    def check(self) -> None:
        if self.episodes < 1 or self.horizon < 1:
            raise ValueError("episodes and horizon must be >= 1")
        if not self.min_gain >= 0:
            raise ValueError(f"min_gain must be >= 0, got {self.min_gain}")


def evaluation_seeds(config: EvaluationConfig, seed: int = 0) -> list[int]:
    """The reset seeds on which every model of training seed ``seed`` (the reference included) is evaluated:
    the same for all of them, so their differences are paired, and drawn anew for each training seed, so an
    interval over seeds holds the evaluation's own noise as well as the training's (docs/maths.md (64))."""
    rng = np.random.default_rng([config.seed, 0xE7A1, seed])
    return [int(s) for s in rng.integers(0, 2**31, config.episodes)]


def episode_returns(policy: GaussianMLP, sims: Simulators, tasks: list[TaskSpec], config: EvaluationConfig,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The policy's return and the steps it ran before its episode terminated, per task and evaluation episode
    of training seed ``seed``: two arrays (k, episodes). A terminated episode's return counts the absorbing
    reward of each remaining step up to the horizon (docs/maths.md section 13)."""
    jobs = [(i, e, s) for i in range(len(tasks)) for e, s in enumerate(evaluation_seeds(config, seed))]
    returns = np.zeros((len(tasks), config.episodes))
    lengths = np.zeros((len(tasks), config.episodes), dtype=int)
    for start in range(0, len(jobs), len(sims.envs)):
        batch = jobs[start:start + len(sims.envs)]
        batch_tasks = [tasks[i] for i, _, _ in batch]
        goals = np.stack([t.goal for t in batch_tasks])
        obs = sims.reset([s for _, _, s in batch])
        done = sims.rollout(obs, lambda o, t: policy.act(np.concatenate([o, goals], axis=1)), config.horizon,
                            batch_tasks)
        rows, columns = [i for i, _, _ in batch], [e for _, e, _ in batch]
        returns[rows, columns] = done.rewards.sum(axis=1)
        lengths[rows, columns] = done.lengths
    return returns, lengths


def normalized_returns(returns: np.ndarray, reference: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """(R - R_ref) / gain, per task (last axis): R_ref the reference's return on the same episodes as R, gain
    the specialists' mean gain over the reference (docs/maths.md (61))."""
    return (returns - reference) / gain

