"""Tests of amalab.training.sampler: epochs visit every example once, seeding, exact resume, errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from amalab.training.sampler import TaskSampler


def test_every_example_is_drawn_once_per_epoch():
    sizes = [5, 3, 7]
    sampler = TaskSampler(sizes, seed=11)
    rng = np.random.default_rng(0)
    task_ids = rng.integers(0, 3, size=400)
    draws = sampler.take(task_ids)
    assert [t for t, _ in draws] == task_ids.tolist()  # one draw per requested slot, in order
    for task, n in enumerate(sizes):
        indices = [i for t, i in draws if t == task]
        full_epochs = len(indices) // n
        for e in range(full_epochs):
            assert sorted(indices[e * n:(e + 1) * n]) == list(range(n))  # a permutation each epoch
        assert len(set(indices[full_epochs * n:])) == len(indices) - full_epochs * n  # partial: no repeats
        assert sampler.epochs[task] == (len(indices) - 1) // n


def test_each_epoch_is_a_new_permutation():
    sampler = TaskSampler([20], seed=0)
    epochs = [tuple(i for _, i in sampler.take([0] * 20)) for _ in range(4)]
    assert len(set(epochs)) == 4


def test_uniform_over_examples_on_average():
    # the first draw of a task, over seeds, is uniform over its examples (chi-square, fixed seeds)
    n, seeds = 6, 6000
    counts = Counter(TaskSampler([n], seed=s).take([0])[0][1] for s in range(seeds))
    expected = seeds / n
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(n))
    assert chi2 < 20.5  # 99.9 % quantile of chi-square with 5 degrees of freedom


def test_same_seed_same_draws_and_tasks_are_independent_of_each_other():
    ids = [0, 1, 1, 0, 2, 2, 2, 0] * 10
    assert TaskSampler([4, 5, 6], 3).take(ids) == TaskSampler([4, 5, 6], 3).take(ids)
    assert TaskSampler([4, 5, 6], 3).take(ids) != TaskSampler([4, 5, 6], 4).take(ids)
    # the order of task 1's examples does not depend on how often the other tasks were drawn
    only_1 = [i for _, i in TaskSampler([4, 5, 6], 3).take([1] * 12)]
    mixed = [i for t, i in TaskSampler([4, 5, 6], 3).take(ids) if t == 1][:12]
    assert only_1 == mixed


def test_resume_mid_epoch_equals_uninterrupted():
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 3, size=7) for _ in range(30)]
    uninterrupted = TaskSampler([4, 9, 2], seed=8)
    expected = [uninterrupted.take(b) for b in batches]

    first = TaskSampler([4, 9, 2], seed=8)
    got = [first.take(b) for b in batches[:13]]
    state = json.loads(json.dumps(first.state_dict()))  # survives a trip through JSON
    assert any(0 < p < n for p, n in zip(state["positions"], state["sizes"]))  # really mid-epoch
    resumed = TaskSampler([4, 9, 2], seed=8)
    resumed.load_state_dict(state)
    got += [resumed.take(b) for b in batches[13:]]
    assert got == expected
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_invalid_task_ids_leave_the_state_untouched():
    sampler = TaskSampler([3, 3], seed=0, task_names=["hh", "tqa"])
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=r"task id 2 is out of range: there are 2 tasks \(ids 0 to 1\)"):
        sampler.take([0, 1, 2])
    with pytest.raises(ValueError, match="task id -1 is out of range"):
        sampler.take(np.array([-1]))
    with pytest.raises(ValueError, match="task id must be an integer, got 1.0"):
        sampler.take(np.array([1.0]))
    assert sampler.state_dict() == before


def test_empty_task_and_bad_state_errors():
    with pytest.raises(ValueError, match=r"tqa \(task id 1\) has no training examples"):
        TaskSampler([3, 0], seed=0, task_names=["hh", "tqa"])
    with pytest.raises(ValueError, match="at least one task"):
        TaskSampler([], seed=0)
    sampler = TaskSampler([3, 4], seed=1)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="saved with seed 1, this sampler has seed 2"):
        TaskSampler([3, 4], seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="the training data changed"):
        TaskSampler([3, 5], seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="position 9 out of range"):
        sampler.load_state_dict({**state, "positions": [0, 9]})
