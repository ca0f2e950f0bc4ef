"""Behaviour policies of graded quality for each task, trained by the cross-entropy method (CEM).

A behaviour policy is linear, a = W o + b on the environment's observation o, and acts with Gaussian noise
of standard deviation ``noise`` when it generates data. CEM keeps a diagonal Gaussian over (W, b): each
iteration draws ``population`` candidates, scores each by its mean task return over ``episodes`` rollouts of
``horizon`` steps (the same reset seeds for every candidate of an iteration: common random numbers), and
refits the Gaussian to the best ``elite`` fraction. The mean after iteration j, for each j in ``levels``,
is one behaviour policy of the task: the first level is the poor one, the last the best.

With ``normalize``, CEM searches over policies of the standardized observation, a = W (o - mu) / sigma + b
(as augmented random search does: Mania et al., 2018), mu and sigma (plus 0.01, so that a coordinate that
barely moves is not blown up) the per-coordinate mean and standard deviation of the observations of one
batch of episodes under the action noise alone. Without it, the same initial std means a different search
for an observation in metres than for one in radians per second, which keeps CEM's budget from moving a
body with many coordinates (Ant). Every policy CEM scores or returns is folded back to a = W' o + b'
(W' = W / sigma, b' = b - W' mu), so the data's generation and its caches see linear policies either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from amalab.control.simulator import Simulators
from amalab.control.tasks import TaskSpec


@dataclass(frozen=True)
class BehaviourConfig:
    """CEM settings; ``levels``: the iterations whose mean becomes a behaviour policy (0: before any)."""

    population: int = 16
    elite: float = 0.25
    iterations: int = 8
    horizon: int = 100
    episodes: int = 1
    init_std: float = 0.5
    min_std: float = 0.05
    noise: float = 0.3
    levels: list[int] = field(default_factory=lambda: [1, 4, 8])
    normalize: bool = False

    def check(self) -> None:
        if self.population < 2 or self.iterations < 1 or self.horizon < 1 or self.episodes < 1:
            raise ValueError("population must be >= 2, iterations, horizon and episodes >= 1")
        if not 0 < self.elite <= 1:
            raise ValueError(f"elite must lie in (0, 1], got {self.elite}")
        if len(self.levels) < 2 or sorted(set(self.levels)) != list(self.levels) or \
                not 0 <= self.levels[0] <= self.levels[-1] <= self.iterations:
            raise ValueError(f"levels must be >= 2 increasing iterations in [0, iterations], got {self.levels}")
        if self.noise < 0 or self.init_std <= 0 or self.min_std < 0:
            raise ValueError("noise and min_std must be >= 0, init_std > 0")
        if self.normalize and not self.noise > 0:
            raise ValueError("normalize needs noise > 0: its statistics come from episodes under the action noise")


def linear_actions(params: np.ndarray, observations: np.ndarray, d: int) -> np.ndarray:
    """a = W o + b for per-environment parameters (n, a*(d+1)) (W row-major, then b) and observations (n, d)."""
    n = len(params)
    weights = params.reshape(n, -1, d + 1)
    return np.einsum("nad,nd->na", weights[..., :d], observations) + weights[..., d]


def _returns(sims: Simulators, params: np.ndarray, task: TaskSpec, seeds: list[int], horizon: int) -> np.ndarray:
    """Mean return of each candidate (rows of ``params``) over the reset seeds, in batches of the simulators."""
    d, n_sims = sims.observation_size, len(sims.envs)
    jobs = [(c, s) for c in range(len(params)) for s in seeds]
    totals = np.zeros(len(params))
    for start in range(0, len(jobs), n_sims):
        batch = jobs[start:start + n_sims]
        obs = sims.reset([s for _, s in batch])
        rows = params[[c for c, _ in batch]]
        done = sims.rollout(obs, lambda o, t: linear_actions(rows, o, d), horizon, [task] * len(batch))
        np.add.at(totals, [c for c, _ in batch], done.rewards.sum(axis=1))
    return totals / len(seeds)


def observation_statistics(sims: Simulators, task: TaskSpec, config: BehaviourConfig,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma + 0.01) of the observations of one batch of episodes with actions N(0, noise^2), each
    episode's steps up to its termination (module docstring)."""
    n, a = len(sims.envs), sims.action_size
    obs = sims.reset([int(s) for s in rng.integers(0, 2**31, n)])
    ran = sims.rollout(obs, lambda o, t: rng.normal(0.0, config.noise, (n, a)), config.horizon, [task] * n)
    seen = np.concatenate([ran.observations[j, :max(int(ran.lengths[j]), 1)] for j in range(n)])
    return seen.mean(axis=0), seen.std(axis=0) + 0.01


def fold_standardization(params: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Parameters (m, a*(d+1)) of a = W (o - mean) / scale + b, as those of the same policy on the raw
    observation: W' = W / scale, b' = b - W' mean."""
    d = len(mean)
    w = params.reshape(len(params), -1, d + 1)
    weights = w[..., :d] / scale
    bias = w[..., d] - weights @ mean
    return np.concatenate([weights, bias[..., None]], axis=-1).reshape(params.shape)


def train_behaviour(sims: Simulators, task: TaskSpec, config: BehaviourConfig, seed: int,
                    show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CEM on ``task``: (policies (levels, a*(d+1)), their mean returns at the last iteration's seeds)."""
    rng = np.random.default_rng([seed, 0xCE])
    size = sims.action_size * (sims.observation_size + 1)
    stats = observation_statistics(sims, task, config, rng) if config.normalize else None

    def raw(params: np.ndarray) -> np.ndarray:  # CEM's parameters as those of a policy on the raw observation
        return params if stats is None else fold_standardization(params, *stats)

    mean, std = np.zeros(size), np.full(size, config.init_std)
    n_elite = max(1, int(round(config.elite * config.population)))
    snapshots = {0: mean.copy()}
    for iteration in tqdm(range(1, config.iterations + 1), desc=f"behaviour {task.name}", unit="iter",
                          disable=not show_progress, mininterval=1.0):
        seeds = [int(s) for s in rng.integers(0, 2**31, config.episodes)]
        candidates = mean + std * rng.standard_normal((config.population, size))
        returns = _returns(sims, raw(candidates), task, seeds, config.horizon)
        elite = candidates[np.argsort(-returns)[:n_elite]]
        mean, std = elite.mean(axis=0), np.maximum(elite.std(axis=0), config.min_std)
        snapshots[iteration] = mean.copy()
    policies = raw(np.stack([snapshots[level] for level in config.levels]))
    check_seeds = [int(s) for s in rng.integers(0, 2**31, max(config.episodes, 4))]
    return policies, _returns(sims, policies, task, check_seeds, config.horizon)
