"""Per-task preference datasets drawn from the segment pool: sizes (imbalance), quality mix, teacher.

Task i (of k) keeps the first n_i = round(train_starts / imbalance^(i/(k-1))) training starts, so task 0
has the most pairs and the last task ``imbalance`` times fewer. Each slot of a pair is the poor policy's
continuation with probability ``poor_share``, else the better one's (:mod:`amalab.control.segments`).
The simulated teacher (:mod:`amalab.control.teacher`) labels each pair; skipped pairs and ties are dropped.
Held-out pairs come from the held-out starts, drawn and labelled the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amalab.control.segments import KINDS
from amalab.control.tasks import TaskSpec, with_goal
from amalab.control.teacher import TeacherConfig, label_pairs


@dataclass(frozen=True)
class Segment:
    """One continuation as the policy sees it: observations with the task's goal (L, D), actions (L, a), and
    how many actions it took before its episode terminated (L if it did not; the rest is padding)."""

    observations: np.ndarray
    actions: np.ndarray
    length: int


@dataclass(frozen=True)
class Pair:
    """A preference pair of one start: what the training step and the per-example losses take."""

    id: str
    task: int
    chosen: Segment
    rejected: Segment


@dataclass
class TaskData:
    """One task's pairs and the teacher's counts."""

    train: list[Pair]
    held_out: list[Pair]
    counts: dict


def task_sizes(starts: int, k: int, imbalance: float) -> list[int]:
    """n_i = round(starts / imbalance^(i/(k-1))), at least 1."""
    return [max(1, round(starts / imbalance ** (i / max(k - 1, 1)))) for i in range(k)]


def _slot_kinds(n: int, poor_share: float, rng: np.random.Generator) -> np.ndarray:
    """For each pair, the pool index (into KINDS) of its two continuations."""
    poor = rng.random((n, 2)) < poor_share
    index = {kind: i for i, kind in enumerate(KINDS)}
    return np.array([[index[(slot, bool(poor[j, slot]))] for slot in (0, 1)] for j in range(n)])


def _pairs(pool: dict, task: TaskSpec, task_index: int, starts: np.ndarray, split: str, poor_share: float,
           teacher: TeacherConfig, all_returns: np.ndarray, rng: np.random.Generator) -> tuple[list[Pair], dict]:
    kinds = _slot_kinds(len(starts), poor_share, rng)
    rewards = pool["rewards"][starts[:, None], kinds]  # (n, 2, L)
    labels = label_pairs(rewards[:, 0], rewards[:, 1], teacher, all_returns, rng)
    pairs = []
    for j in np.flatnonzero(labels.kept):
        order = (0, 1) if labels.first_preferred[j] else (1, 0)
        chosen, rejected = (Segment(with_goal(pool["observations"][starts[j], kinds[j, m]], task),
                                    pool["actions"][starts[j], kinds[j, m]], int(pool["lengths"][starts[j], kinds[j, m]]))
                            for m in order)
        pairs.append(Pair(f"{task.name}/{split}/{starts[j]}", task_index, chosen, rejected))
    counts = {"pairs": len(pairs), "skipped": int(labels.skipped.sum()), "tied": int(labels.tied.sum()),
              "flipped": int((labels.flipped & labels.kept).sum())}
    return pairs, counts


def build_task_data(pool: dict, task: TaskSpec, task_index: int, train_starts: int, size: int,
                    poor_share: float, teacher: TeacherConfig, seed: int) -> TaskData:
    """Task ``task_index``'s training pairs (from its first ``size`` training starts) and held-out pairs."""
    rng = np.random.default_rng([seed, task_index, 0xDA7A])
    all_returns = pool["rewards"][:train_starts].sum(-1).ravel()
    train, counts = _pairs(pool, task, task_index, np.arange(size), "train", poor_share, teacher, all_returns,
                           rng)
    held_out, held_counts = _pairs(pool, task, task_index, np.arange(train_starts, len(pool["rewards"])),
                                   "eval", poor_share, teacher, all_returns, rng)
    return TaskData(train, held_out, {**counts, "held_out_pairs": held_counts["pairs"]})
