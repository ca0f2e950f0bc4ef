"""The simulated teacher's rates against their closed forms, with binomial intervals at fixed seeds."""

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit

from amalab.control.teacher import TeacherConfig, label_pairs, myopic_returns

N = 20000


def _inside(successes: int, n: int, p: float) -> None:
    """p lies in the 99.9% Clopper-Pearson interval of successes / n."""
    interval = stats.binomtest(successes, n).proportion_ci(0.999)
    assert interval.low <= p <= interval.high, (successes / n, p, interval)


def test_myopic_returns_weigh_later_steps_more():
    rewards = np.random.default_rng(0).normal(size=(5, 7))
    expected = [sum(0.9 ** (6 - t) * r[t] for t in range(7)) for r in rewards]
    np.testing.assert_allclose(myopic_returns(rewards, 0.9), expected)


def test_rational_teacher_prefers_the_larger_myopic_return():
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(2, 500, 10))
    labels = label_pairs(first, second, TeacherConfig(gamma=0.8), first.sum(1), rng)
    assert labels.kept.all()
    np.testing.assert_array_equal(labels.first_preferred,
                                  myopic_returns(first, 0.8) >= myopic_returns(second, 0.8))


@pytest.mark.parametrize("mistake", [0.1, 0.3])
def test_mistake_rate(mistake):
    rng = np.random.default_rng(2)
    first, second = rng.normal(size=(2, N, 5))
    labels = label_pairs(first, second, TeacherConfig(mistake=mistake), first.sum(1), rng)
    wrong = labels.first_preferred != (first.sum(1) >= second.sum(1))
    _inside(int(wrong.sum()), N, mistake)


@pytest.mark.parametrize("beta,mistake", [(0.5, 0.0), (2.0, 0.2)])
def test_bradley_terry_choice(beta, mistake):
    rng = np.random.default_rng(3)
    margin = 0.7  # every pair: the first segment's return exceeds the second's by 0.7
    first, second = np.full((N, 1), margin), np.zeros((N, 1))
    labels = label_pairs(first, second, TeacherConfig(beta=beta, mistake=mistake), np.array([0.0, 1.0]), rng)
    p = expit(beta * margin)
    _inside(int(labels.first_preferred.sum()), N, p * (1 - mistake) + (1 - p) * mistake)


def test_skip_rate():
    rng = np.random.default_rng(4)
    first, second = rng.normal(size=(2, N, 1))
    pool = rng.normal(size=200000)
    labels = label_pairs(first, second, TeacherConfig(skip=0.3), pool, rng)
    threshold = np.quantile(pool, 0.3)
    _inside(int(labels.skipped.sum()), N, stats.norm.cdf(threshold) ** 2)  # both below it
    assert not labels.kept[labels.skipped].any()


def test_equal_rate():
    rng = np.random.default_rng(5)
    first, second = rng.normal(size=(2, N, 1))
    pool = rng.normal(size=200000)
    labels = label_pairs(first, second, TeacherConfig(equal=0.2), pool, rng)
    # R1 - R2 ~ N(0, 2): P(|R1 - R2| < 0.2 std(pool))
    p = 2 * stats.norm.cdf(0.2 * pool.std() / math.sqrt(2)) - 1
    _inside(int(labels.tied.sum()), N, p)
    assert labels.kept.sum() == N - labels.tied.sum()
