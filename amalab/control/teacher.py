"""B-Pref's simulated teacher (Lee et al. 2021, "B-Pref: benchmarking preference-based reinforcement
learning"): a labeller who is myopic, stochastic, makes mistakes, skips and calls ties.

For two segments of one start with task rewards r^1_t, r^2_t (t = 0..L-1):

1. skip: if both undiscounted returns sum_t r_t lie below the skip threshold, the pair gets no label;
2. equal: if the undiscounted returns differ by less than the equal threshold, the pair is a tie. B-Pref
   labels a tie 0.5; the per-example losses here take one chosen and one rejected reply, so ties are dropped
   (and counted);
3. myopic returns R^m = sum_t gamma^{L-1-t} r^m_t (later steps weigh more);
4. Bradley-Terry choice: segment 1 is preferred with probability sigmoid(beta (R^1 - R^2)); beta = inf is
   the perfectly rational teacher (the larger R wins; an exact tie goes to segment 1);
5. mistake: the label is flipped with probability ``mistake``.

The thresholds are per task, so that one setting fits tasks whose rewards have different scales: skip
below the ``skip`` quantile of the task's undiscounted segment returns (0: never skip), tie when the
difference is below ``equal`` times their standard deviation (0: never).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit


@dataclass(frozen=True)
class TeacherConfig:
    beta: float = math.inf
    gamma: float = 1.0
    mistake: float = 0.0
    skip: float = 0.0
    equal: float = 0.0

    def check(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (inf: perfectly rational), got {self.beta}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if not 0 <= self.mistake <= 1 or not 0 <= self.skip < 1 or self.equal < 0:
            raise ValueError("mistake must lie in [0, 1], skip in [0, 1), equal >= 0")


@dataclass
class Labels:
    """The teacher's answer for each pair: kept (neither skipped nor a tie) and, if kept, first_preferred."""

    first_preferred: np.ndarray  # bool (n,)
    skipped: np.ndarray  # bool (n,)
    tied: np.ndarray  # bool (n,), not skipped
    flipped: np.ndarray  # bool (n,): a mistake flipped the label

    @property
    def kept(self) -> np.ndarray:
        return ~(self.skipped | self.tied)


def myopic_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """sum_t gamma^{L-1-t} r_t over the last axis."""
    length = rewards.shape[-1]
    return rewards @ gamma ** np.arange(length - 1, -1, -1, dtype=float)


def label_pairs(first: np.ndarray, second: np.ndarray, teacher: TeacherConfig, all_returns: np.ndarray,
                rng: np.random.Generator) -> Labels:
    """Labels of pairs with rewards ``first``, ``second`` (n, L); ``all_returns``: the task's undiscounted
    segment returns the thresholds are measured on."""
    total1, total2 = first.sum(-1), second.sum(-1)
    skip_at = np.quantile(all_returns, teacher.skip) if teacher.skip > 0 else -np.inf
    skipped = np.maximum(total1, total2) < skip_at
    tied = ~skipped & (np.abs(total1 - total2) < teacher.equal * np.std(all_returns))
    margin = myopic_returns(first, teacher.gamma) - myopic_returns(second, teacher.gamma)
    if math.isinf(teacher.beta):
        first_preferred = margin >= 0
    else:
        first_preferred = rng.random(len(margin)) < expit(teacher.beta * margin)
    flipped = rng.random(len(margin)) < teacher.mistake
    return Labels(first_preferred ^ flipped, skipped, tied, flipped)
