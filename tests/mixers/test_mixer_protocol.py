"""The statistics / coefficients / update split of the mixers (docs/maths.md section 8) and their guards.

References: the mixers' own one-batch ``step`` (which the convex lab's numbers rest on, themselves
checked against loops in test_mixers.py), hand computations of simultaneous AMA-R, and plain numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from amalab.mixers import AMAR, AMAS, Exp3, ExpGradWeights, exp3_gamma, make_mixer
from amalab.mixers.excess import COUNT

OPTIONS = {
    "ama-r": {"eta_alpha": 0.7},
    "ama-r-sim": {"eta_alpha": 0.7},
    "ama-s": {"gamma": 0.3},
    "standard": {"sizes": [10, 20, 30]},
    "uniform": {},
    "mixture": {"weights": [0.2, 0.3, 0.5]},
    "doremi": {"eta_alpha": 0.7},
    "odm": {"gamma": 0.3},
}


def batches(seed, n_steps=5, batch_size=12, k=3):
    rng = np.random.default_rng(seed)
    for _ in range(n_steps):
        yield rng, rng.random(batch_size) * 2, rng.random(batch_size)


def split_step(mixer, task_ids, losses, baseline, pieces):
    """One optimizer step over micro-batches: per-piece statistics and coefficients, one update."""
    parts = np.array_split(np.arange(len(task_ids)), pieces)
    stats = sum(mixer.statistics(task_ids[p], losses[p], baseline[p]) for p in parts)
    counts = stats[COUNT]
    coeffs = np.zeros(len(task_ids))
    if mixer.update_first:
        mixer.update(stats)
    for p in parts:
        coeffs[p] = mixer.coefficients(task_ids[p], losses[p], baseline[p], counts)
    if not mixer.update_first:
        mixer.update(stats)
    return coeffs


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("pieces", [2, 3, 12])
def test_micro_batches_equal_one_batch(name, pieces):
    whole = make_mixer(name, 3, **OPTIONS[name])
    split = make_mixer(name, 3, **OPTIONS[name])
    for rng, losses, baseline in batches(1):
        task_ids = whole.draw(rng, 12)
        expected = whole.step(task_ids, losses, baseline)
        got = split_step(split, task_ids, losses, baseline, pieces)
        np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)
        for key, value in whole.state_dict().items():
            np.testing.assert_allclose(split.state_dict()[key], value, rtol=1e-13, atol=1e-15, err_msg=key)


def test_statistics_add_and_travel_as_one_float64_array():
    mixer = make_mixer("ama-s", 4, gamma=0.5)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 4, 20)
    losses, baseline = rng.random(20), rng.random(20)
    stats = mixer.statistics(ids, losses, baseline)
    assert stats.dtype == np.float64 and stats.shape == (3, 4)
    # by hand: counts, sums of max(l - s, 0), sums of l - s
    for i in range(4):
        members = ids == i
        assert stats[0, i] == members.sum()
        assert stats[1, i] == pytest.approx(np.maximum(losses - baseline, 0)[members].sum(), abs=1e-14)
        assert stats[2, i] == pytest.approx((losses - baseline)[members].sum(), abs=1e-14)
    halves = mixer.statistics(ids[:7], losses[:7], baseline[:7]) + mixer.statistics(ids[7:], losses[7:], baseline[7:])
    np.testing.assert_allclose(halves, stats, rtol=1e-14, atol=1e-15)
    # what an all-reduce sends: one flat buffer, restored exactly
    np.testing.assert_array_equal(np.frombuffer(stats.ravel().tobytes()).reshape(3, 4), stats)


def test_coefficients_are_pure():
    mixer = make_mixer("ama-r-sim", 3, eta_alpha=1.0)
    ids = np.array([0, 1, 2, 0, 1, 2])
    before = mixer.state_dict()
    mixer.coefficients(ids, np.ones(6), np.zeros(6))
    for key, value in mixer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_simultaneous_amar_by_hand():
    eta = 0.9
    mixer = AMAR(2, eta, simultaneous=True)
    ids = np.array([0, 1, 0, 1])
    # step 1: theta steps with alpha_1 = uniform; g = per-task mean clipped excess
    losses, baseline = np.array([1.0, 0.2, 0.4, 0.9]), np.array([0.5, 0.5, 0.6, 0.1])
    coeffs = mixer.step(ids, losses, baseline)
    active = (losses > baseline).astype(float)
    np.testing.assert_allclose(coeffs, 0.5 / 2 * active, rtol=1e-15)
    g1 = np.array([(0.5 + 0.0) / 2, (0.0 + 0.8) / 2])
    alpha2 = np.exp(eta * g1) / np.exp(eta * g1).sum()
    np.testing.assert_allclose(mixer.weights, alpha2, rtol=1e-14)
    np.testing.assert_allclose(mixer.average_weights, [0.5, 0.5], rtol=1e-15)  # mean of alpha_1
    # step 2: theta steps with alpha_2, then alpha_3; the average is that of alpha_1 and alpha_2
    coeffs = mixer.step(ids, losses, baseline)
    np.testing.assert_allclose(coeffs, alpha2[ids] / 2 * active, rtol=1e-14)
    np.testing.assert_allclose(mixer.average_weights, (0.5 + alpha2) / 2, rtol=1e-14)
    # sequential play on the same batch steps with alpha_2 already at step 1
    sequential = AMAR(2, eta)
    np.testing.assert_allclose(sequential.step(ids, losses, baseline), alpha2[ids] / 2 * active, rtol=1e-14)


# ------------------------------------------------------------------------------ bad state never passes


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("where", ["loss", "baseline"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_raise_naming_step_and_task(name, where, bad):
    mixer = make_mixer(name, 3, **OPTIONS[name])
    ids = np.array([0, 1, 2, 0, 1, 2])
    mixer.step(ids, np.ones(6), np.zeros(6))
    losses, baseline = np.ones(6), np.zeros(6)
    (losses if where == "loss" else baseline)[4] = bad
    before = mixer.state_dict()
    what = "non-finite loss" if where == "loss" else "non-finite baseline loss"
    with pytest.raises(ValueError, match=f"step 2: task 1 has a {what}"):
        mixer.step(ids, losses, baseline)
    for key, value in mixer.state_dict().items():  # nothing was changed by the failed step
        np.testing.assert_array_equal(value, before[key])


def test_non_finite_statistics_raise():
    mixer = make_mixer("ama-s", 3, gamma=0.5)
    stats = mixer.statistics(np.array([0, 1, 2]), np.ones(3), np.zeros(3))
    stats[1, 2] = math.nan
    with pytest.raises(ValueError, match="step 1: task 2 has non-finite statistics"):
        mixer.update(stats)
    with pytest.raises(ValueError, match="shape"):
        mixer.update(stats[:, :2])


def test_exp3_probs_follow_an_in_place_write():
    exp3 = Exp3(3, 0.3)
    first = exp3.probs()
    exp3.log_weights[1] = 2.0  # in place: the array object is the same
    p = np.exp([0.0, 2.0, 0.0]) / np.exp([0.0, 2.0, 0.0]).sum() * 0.7 + 0.1
    np.testing.assert_allclose(exp3.probs(), p, rtol=1e-15)
    first[0] = 5.0  # a caller writing into a returned array does not touch the state
    np.testing.assert_allclose(exp3.probs(), p, rtol=1e-15)


def stepped(name, steps=3):
    mixer = make_mixer(name, 3, **OPTIONS[name])
    for rng, losses, baseline in batches(3, steps):
        mixer.step(mixer.draw(rng, 12), losses, baseline)
    return mixer


CORRUPTIONS = [
    ("ama-r", "eg.log_weights", lambda v: v + 0.1, "not normalized"),
    ("ama-r", "eg.log_weights", lambda v: np.where(np.arange(3) == 0, np.nan, v), "non-finite"),
    ("ama-r", "alpha_sum", lambda v: v * 1.5, "sum to"),
    ("ama-r", "alpha_sum", lambda v: v - 5.0, "negative"),
    ("ama-r", "steps", lambda v: -v, "negative"),
    ("ama-s", "exp3.log_weights", lambda v: v + np.array([np.inf, 0, 0]), "non-finite"),
    ("ama-s", "probs_sum", lambda v: v * 2.0, "sum to"),
    ("ama-s", "scale", lambda v: v * np.nan, "non-finite"),
    ("ama-s", "clipped_gains", lambda v: v - 7, "negative"),
    ("uniform", "steps", lambda v: v - 9, "negative"),
]


@pytest.mark.parametrize("name,key,corrupt,message", CORRUPTIONS)
def test_load_state_dict_rejects_corrupt_state(name, key, corrupt, message):
    source, target = stepped(name), stepped(name, steps=1)
    before = target.state_dict()
    state = source.state_dict()
    state[key] = corrupt(state[key])
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    for k, value in target.state_dict().items():  # a refused state changes nothing
        np.testing.assert_array_equal(value, before[k])
    target.load_state_dict(source.state_dict())  # the uncorrupted state loads


def test_plain_weight_objects_reject_corrupt_state():
    eg = ExpGradWeights(3, 0.5)
    with pytest.raises(ValueError, match="not normalized"):
        eg.load_state_dict({"log_weights": np.zeros(3)})
    exp3 = Exp3(3, 0.5)
    exp3.load_state_dict({"log_weights": np.array([5.0, 1.0, 2.0])})  # any shift of log w is a valid state
    with pytest.raises(ValueError, match="non-finite"):
        exp3.load_state_dict({"log_weights": np.array([np.nan, 1.0, 2.0])})


def test_amas_state_resumes_exactly_after_save():
    a = stepped("ama-s")
    b = make_mixer("ama-s", 3, **OPTIONS["ama-s"])
    b.load_state_dict(a.state_dict())
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    ids = a.draw(rng_a, 12)
    np.testing.assert_array_equal(ids, b.draw(rng_b, 12))
    losses, baseline = rng_a.random(12), rng_a.random(12)
    np.testing.assert_array_equal(a.step(ids, losses, baseline), b.step(ids, losses, baseline))
    np.testing.assert_array_equal(a.weights, b.weights)


def test_exp3_gamma_vectorized_matches_the_formula():
    horizons = np.array([1.0, 10.0, 256.0, 65536.0])
    gammas = exp3_gamma(5, horizons)
    expected = [min(1.0, math.sqrt(5 * math.log(5) / ((math.e - 1) * T))) for T in horizons]
    np.testing.assert_allclose(gammas, expected, rtol=1e-15)
    assert exp3_gamma(5, 256.0) == pytest.approx(expected[2], rel=1e-15)
    assert exp3_gamma(1, 100.0) == 1.0
    with pytest.raises(ValueError, match="horizon"):
        exp3_gamma(3, 0.0)


def test_sequential_amar_needs_every_task():
    mixer = AMAR(3, 1.0)
    stats = mixer.statistics(np.array([0, 1, 0, 1]), np.ones(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"tasks \[2\] have no example"):
        mixer.update(stats)
    assert isinstance(make_mixer("ama-r-sim", 3, eta_alpha=1.0), AMAR)
    assert not isinstance(make_mixer("odm", 3, gamma=0.5), AMAR) and isinstance(make_mixer("odm", 3, gamma=0.5), AMAS)
