"""The pool of simulated segments every dataset of a run is drawn from.

For each task and each start s (the prompt): reset the environment with a seeded state, run a behaviour
policy of a random level for a random number of steps (``prefix_steps``), and from the state reached run
four continuations of ``segment_length`` steps with behaviour noise: two from the task's poor policy (the
first level) and two from a better level drawn at random. A body that falls ends its segment there
(:mod:`amalab.control.simulator`); one that falls during the prefix starts from its last state before the
fall. A pair is two continuations of one start, one of
each slot; the mixed-quality knob chooses, for each slot, the poor continuation with probability
``poor_share`` (:mod:`amalab.control.dataset`), so every dataset of a sweep reuses one simulation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from amalab.control.behaviour import linear_actions
from amalab.control.simulator import Simulators
from amalab.control.tasks import TaskSpec

#: continuation kinds, in the pool's second axis: (slot, poor?)
KINDS = ((0, True), (1, True), (0, False), (1, False))


@dataclass(frozen=True)
class PoolConfig:
    """How many starts per task (training and held-out) and how long prompts and segments are."""

    train_starts: int = 200
    eval_starts: int = 50
    segment_length: int = 25
    prefix_steps: list[int] = field(default_factory=lambda: [10, 40])  # [min, max]

    def check(self) -> None:
        if self.train_starts < 1 or self.eval_starts < 1 or self.segment_length < 1:
            raise ValueError("train_starts, eval_starts and segment_length must be >= 1")
        if len(self.prefix_steps) != 2 or not 0 <= self.prefix_steps[0] <= self.prefix_steps[1]:
            raise ValueError(f"prefix_steps must be [min, max] with 0 <= min <= max, got {self.prefix_steps}")


def _continue(sims, qpos, qvel, params, noise, length, task, rng):
    obs = sims.set_states(qpos, qvel)
    d = sims.observation_size
    return sims.rollout(obs, lambda o, t: linear_actions(params, o, d)
                        + noise * rng.standard_normal((len(o), sims.action_size)), length, [task] * len(obs))


def _simulate_starts(sims: Simulators, task: TaskSpec, policies: np.ndarray, noise: float, config: PoolConfig,
                     seeds: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four continuations of each start in ``seeds`` (at most len(sims.envs) of them)."""
    n, (low, high), levels = len(seeds), config.prefix_steps, len(policies)
    prefix = rng.integers(low, high + 1, n)
    prefix_params = policies[rng.integers(0, levels, n)]
    d = sims.observation_size
    ran = sims.rollout(sims.reset(seeds), lambda o, t: linear_actions(prefix_params, o, d)
                       + noise * rng.standard_normal((n, sims.action_size)), high + 1, [task] * n,
                       record_states=True)
    # the start: the state after prefix[j] steps or, if the body fell before, the last state before it fell
    at = np.minimum(prefix, ran.lengths - 1)
    qpos, qvel = ran.qpos[np.arange(n), at], ran.qvel[np.arange(n), at]
    better = rng.integers(1, levels, (n, 2))
    parts = []
    for slot, poor in KINDS:
        level = np.zeros(n, int) if poor else better[:, slot]
        done = _continue(sims, qpos, qvel, policies[level], noise, config.segment_length, task, rng)
        parts.append((done, level))
    return {"observations": np.stack([p.observations for p, _ in parts], 1),
            "actions": np.stack([p.actions for p, _ in parts], 1),
            "rewards": np.stack([p.rewards for p, _ in parts], 1),
            "levels": np.stack([level for _, level in parts], 1),
            "lengths": np.stack([p.lengths for p, _ in parts], 1)}


def simulate_pool(sims: Simulators, task: TaskSpec, policies: np.ndarray, noise: float, config: PoolConfig,
                  seed: int, show_progress: bool = True) -> dict[str, np.ndarray]:
    """Task ``task``'s pool: arrays (starts, 4, L, ...) for observations, actions, rewards; levels and lengths
    (steps before the episode terminated, L if it did not) (starts, 4).

    The first ``train_starts`` starts are for training, the rest held out.
    """
    rng = np.random.default_rng([seed, 0x5E6])
    starts = config.train_starts + config.eval_starts
    seeds = rng.integers(0, 2**31, starts)
    chunks = []
    for begin in tqdm(range(0, starts, len(sims.envs)), desc=f"segments {task.name}", unit="batch",
                      disable=not show_progress, mininterval=1.0):
        chunks.append(_simulate_starts(sims, task, policies, noise, config, seeds[begin:begin + len(sims.envs)],
                                       rng))
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
