"""AMA-R, AMA-S, the fixed-mixture baselines and the registry (docs/maths.md sections 2-4 and 7).

Reference values come from independent numpy loops, closed forms and finite differences on a tiny
linear model with l_j(theta) = (theta . a_j - y_j)^2.
"""

from __future__ import annotations

import numpy as np
import pytest

from amalab.mixers import AMAR, AMAS, MIXERS, FixedMixture, Mixer, make_mixer
from amalab.mixers.excess import active_examples, task_excess, task_statistics
from amalab.mixers.task_batches import TaskLayout


def library_excess(task_ids, losses, refs, k, clip):
    """amalab's (g, active, counts) for a batch."""
    layout = TaskLayout(task_ids, k)
    g = task_excess(task_statistics(layout, losses, refs), clip)
    return g, active_examples(layout, losses, refs, clip), layout.counts

# ---------------------------------------------------------------------------------------------------
# independent reference implementations (plain loops)


def loop_task_excess(task_ids, losses, refs, k, clip):
    """(g, active, counts) of one batch row, with explicit loops."""
    n = len(task_ids)
    refs = np.zeros(n) if refs is None else refs
    g, counts, active = np.zeros(k), np.zeros(k), np.zeros(n)
    for i in range(k):
        members = [j for j in range(n) if task_ids[j] == i]
        counts[i] = len(members)
        if not members:
            continue
        if clip == "example":
            g[i] = sum(max(losses[j] - refs[j], 0.0) for j in members) / len(members)
            for j in members:
                active[j] = 1.0 if losses[j] > refs[j] else 0.0
        else:
            diff = sum(losses[j] - refs[j] for j in members) / len(members)
            g[i] = max(diff, 0.0) if clip == "task" else diff
            for j in members:
                active[j] = (1.0 if diff > 0 else 0.0) if clip == "task" else 1.0
    return g, active, counts


def linear_losses(theta, features, targets):
    return (features @ theta - targets) ** 2


def linear_grads(theta, features, targets):
    return 2.0 * (features @ theta - targets)[:, None] * features


def finite_difference(fun, theta, h=1e-6):
    grad = np.zeros_like(theta)
    for d in range(len(theta)):
        e = np.zeros_like(theta)
        e[d] = h
        grad[d] = (fun(theta + e) - fun(theta - e)) / (2 * h)
    return grad


# ---------------------------------------------------------------------------------------------------
# task_excess


TASK_IDS = np.array([0, 1, 0, 2, 1, 0, 2, 1])
LOSSES = np.array([1.0, 0.2, 0.5, 2.0, 0.9, 0.1, 0.3, 0.4])
REFS = np.array([0.4, 0.5, 0.5, 1.0, 0.3, 0.6, 0.8, 0.1])


def test_task_excess_hand_values():
    # task 0: l - s = 0.6, 0.0, -0.5   task 1: -0.3, 0.6, 0.3   task 2: 1.0, -0.5
    g, active, counts = library_excess(TASK_IDS, LOSSES, REFS, 3, "example")
    np.testing.assert_allclose(g, [0.6 / 3, 0.9 / 3, 1.0 / 2], rtol=1e-14)
    np.testing.assert_array_equal(active, [1, 0, 0, 1, 1, 0, 0, 1])  # l == s is the kink: subgradient 0
    np.testing.assert_array_equal(counts, [3, 3, 2])

    g, active, counts = library_excess(TASK_IDS, LOSSES, REFS, 3, "task")
    np.testing.assert_allclose(g, [0.1 / 3, 0.6 / 3, 0.5 / 2], rtol=1e-12)
    np.testing.assert_array_equal(active, np.ones(8))

    refs = REFS.copy()
    refs[[0, 2, 5]] += 0.2  # task 0: l - s = 0.4, -0.2, -0.7: mean < 0, inactive under clip="task"
    g, active, _ = library_excess(TASK_IDS, LOSSES, refs, 3, "task")
    np.testing.assert_allclose(g, [0.0, 0.2, 0.25], atol=1e-14)
    np.testing.assert_array_equal(active, [0, 1, 0, 1, 1, 0, 1, 1])

    g, active, _ = library_excess(TASK_IDS, LOSSES, refs, 3, "none")
    np.testing.assert_allclose(g, [-0.5 / 3, 0.2, 0.25], rtol=1e-12)
    np.testing.assert_array_equal(active, np.ones(8))

    # a task whose mean excess is exactly 0 sits on the kink of clip="task": g = 0, subgradient 0
    ids = np.array([0, 0, 1])
    g, active, _ = library_excess(ids, np.array([0.5, 0.25, 1.0]), np.array([0.25, 0.5, 0.0]), 2, "task")
    np.testing.assert_array_equal(g, [0.0, 1.0])
    np.testing.assert_array_equal(active, [0, 0, 1])

    # baseline None means s = 0: the raw loss
    g, active, _ = library_excess(TASK_IDS, LOSSES, None, 3, "example")
    np.testing.assert_allclose(g, [1.6 / 3, 1.5 / 3, 2.3 / 2], rtol=1e-14)
    np.testing.assert_array_equal(active, np.ones(8))


@pytest.mark.parametrize("clip", ["example", "task", "none"])
def test_task_excess_matches_loops_batched(clip):
    rng = np.random.default_rng(0)
    k, rows, batch = 4, 6, 10
    task_ids = rng.integers(0, k, size=(rows, batch))
    task_ids[0] = rng.integers(0, 2, size=batch)  # tasks 2, 3 absent from row 0
    losses = rng.random((rows, batch))
    refs = rng.random((rows, batch))
    g, active, counts = library_excess(task_ids, losses, refs, k, clip)
    assert g.shape == (rows, k) and active.shape == (rows, batch) and counts.shape == (rows, k)
    for r in range(rows):
        g_ref, active_ref, counts_ref = loop_task_excess(task_ids[r], losses[r], refs[r], k, clip)
        np.testing.assert_allclose(g[r], g_ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(active[r], active_ref)
        np.testing.assert_array_equal(counts[r], counts_ref)
    np.testing.assert_array_equal(g[0, 2:], 0.0)  # absent tasks have g = 0


def test_task_excess_rejects_unknown_clip():
    with pytest.raises(ValueError, match="clip"):
        library_excess(TASK_IDS, LOSSES, REFS, 3, "batch")


# ---------------------------------------------------------------------------------------------------
# AMA-R


def linear_problem(seed=0, k=3, per_task=3, dim=4):
    rng = np.random.default_rng(seed)
    n = k * per_task
    task_ids = rng.permutation(np.repeat(np.arange(k), per_task))  # task-balanced, shuffled slots
    features = rng.normal(size=(n, dim))
    targets = rng.normal(size=n)
    theta = rng.normal(size=dim)
    return task_ids, features, targets, theta


# l - s per example, by task: every |l - s| >= 0.2 (no kink near theta0); task 1's mean is < 0 and
# task 0's and 2's are > 0, so clip="task" has an inactive task and clip="example" inactive examples
MARGINS = {0: [0.5, -0.3, 0.8], 1: [-0.4, -0.6, 0.3], 2: [0.7, 0.2, -0.5]}


def refs_with_margins(task_ids, losses):
    refs = np.empty_like(losses)
    seen = {i: 0 for i in MARGINS}
    for j, i in enumerate(task_ids):
        refs[j] = losses[j] - MARGINS[i][seen[i]]
        seen[i] += 1
    return refs


@pytest.mark.parametrize("clip", ["example", "task", "none"])
@pytest.mark.parametrize("objective", ["excess", "loss"])
def test_amar_coefficients_are_the_gradient_of_the_mixture(clip, objective):
    k = 3
    task_ids, features, targets, theta0 = linear_problem(seed=1)
    losses0 = linear_losses(theta0, features, targets)
    refs = refs_with_margins(task_ids, losses0)
    eta = 2.0
    mixer = AMAR(k, eta, clip=clip, objective=objective)
    coeffs = mixer.step(task_ids, losses0, refs)
    alpha = mixer.weights.copy()

    # alpha after one step: the closed form uniform * exp(eta g) / Z, g from the loops
    g_ref, _, counts = loop_task_excess(task_ids, losses0, refs, k, clip)
    expected_alpha = np.exp(eta * g_ref) / np.exp(eta * g_ref).sum()
    np.testing.assert_allclose(alpha, expected_alpha, rtol=1e-12)

    def mixture(theta):
        losses = linear_losses(theta, features, targets)
        if objective == "loss":
            per_task = loop_task_excess(task_ids, losses, None, k, "none")[0]
        else:
            per_task = loop_task_excess(task_ids, losses, refs, k, clip)[0]
        return alpha @ per_task

    chain_rule = coeffs @ linear_grads(theta0, features, targets)
    np.testing.assert_allclose(chain_rule, finite_difference(mixture, theta0), rtol=1e-7, atol=1e-8)

    if objective == "loss" or clip == "none":
        np.testing.assert_allclose(coeffs, alpha[task_ids] / counts[task_ids], rtol=1e-14)
    if objective == "excess" and clip == "task":
        assert np.all(coeffs[task_ids == 1] == 0.0)  # task 1's mean excess is clipped
    if objective == "excess" and clip == "example":
        np.testing.assert_array_equal(coeffs == 0.0, losses0 <= refs)


def test_amar_closed_form_from_nonuniform_start():
    rng = np.random.default_rng(2)
    k, eta = 4, 0.8
    alpha0 = rng.dirichlet(np.ones(k))
    mixer = AMAR(k, eta, clip="example")
    mixer.load_state_dict({**mixer.state_dict(), "eg.log_weights": np.log(alpha0)})
    task_ids = mixer.draw(rng, 8)
    losses, refs = rng.random(8), rng.random(8)
    mixer.step(task_ids, losses, refs)
    g = loop_task_excess(task_ids, losses, refs, k, "example")[0]
    expected = alpha0 * np.exp(eta * g)
    np.testing.assert_allclose(mixer.weights, expected / expected.sum(), rtol=1e-12)


def test_amar_smoothing_closed_form():
    rng = np.random.default_rng(3)
    k, eta, c = 3, 5.0, 0.1
    mixer = AMAR(k, eta, smoothing=c)
    alpha = np.full(k, 1 / k)
    for _ in range(4):
        task_ids = mixer.draw(rng, 6)
        losses, refs = rng.random(6) * 3, rng.random(6)
        mixer.step(task_ids, losses, refs)
        g = loop_task_excess(task_ids, losses, refs, k, "example")[0]
        alpha = alpha * np.exp(eta * g)
        alpha = (1 - c) * alpha / alpha.sum() + c / k
        np.testing.assert_allclose(mixer.weights, alpha, rtol=1e-12)


def test_amar_average_weights_is_running_mean():
    rng = np.random.default_rng(4)
    mixer = AMAR(3, 1.5)
    seen = []
    for t in range(6):
        task_ids = mixer.draw(rng, 9)
        mixer.step(task_ids, rng.random(9) * 2, rng.random(9))
        seen.append(mixer.weights.copy())
        np.testing.assert_allclose(mixer.average_weights, np.mean(seen, axis=0), rtol=1e-13)
        np.testing.assert_allclose(mixer.average_weights.sum(), 1.0, rtol=1e-13)
    assert int(mixer.steps) == 6


def test_amar_batched_runs_match_single_runs():
    rng = np.random.default_rng(5)
    etas = np.array([0.1, 1.0, 4.0])
    batched = AMAR(3, etas, batch_shape=(3,))
    singles = [AMAR(3, eta) for eta in etas]
    for _ in range(5):
        task_ids = batched.draw(rng, 6)
        assert task_ids.shape == (3, 6)
        losses, refs = rng.random((3, 6)), rng.random((3, 6))
        coeffs = batched.step(task_ids, losses, refs)
        for r, single in enumerate(singles):
            np.testing.assert_allclose(coeffs[r], single.step(task_ids[r], losses[r], refs[r]), rtol=1e-13)
            np.testing.assert_allclose(batched.weights[r], single.weights, rtol=1e-13)


def test_amar_missing_task_raises():
    mixer = AMAR(3, 1.0)
    with pytest.raises(ValueError, match=r"\[2\]"):
        mixer.step(np.array([0, 1, 0, 1]), np.ones(4), np.zeros(4))
    batched = AMAR(3, 1.0, batch_shape=(2,))
    ids = np.array([[0, 1, 2], [0, 0, 2]])  # row 1 lacks task 1
    with pytest.raises(ValueError, match=r"\[1\]"):
        batched.step(ids, np.ones((2, 3)), np.zeros((2, 3)))
    # nothing changed
    np.testing.assert_allclose(batched.weights, 1 / 3)
    assert int(batched.steps) == 0


@pytest.mark.parametrize("batch_size", [7, 2, 0])
def test_amar_batch_size_not_multiple_of_k_raises(batch_size):
    with pytest.raises(ValueError, match="multiple"):
        AMAR(3, 1.0).draw(np.random.default_rng(0), batch_size)


def test_amar_balanced_draw():
    ids = AMAR(3, 1.0, batch_shape=(2,)).draw(np.random.default_rng(0), 9)
    assert ids.shape == (2, 9)
    for row in ids:
        np.testing.assert_array_equal(np.bincount(row, minlength=3), [3, 3, 3])


def test_amar_bad_options_raise():
    with pytest.raises(ValueError, match="objective"):
        AMAR(3, 1.0, objective="margin")
    with pytest.raises(ValueError, match="clip"):
        AMAR(3, 1.0, clip="batch")
    with pytest.raises(ValueError, match="baseline"):
        AMAR(3, 1.0, baseline="teacher")
    with pytest.raises(ValueError, match="eta_alpha"):
        AMAR(3, -1.0)


def test_amar_state_round_trip():
    rng = np.random.default_rng(6)
    a = AMAR(3, 0.7, smoothing=0.01)
    for _ in range(3):
        ids = a.draw(rng, 6)
        a.step(ids, rng.random(6), rng.random(6))
    b = AMAR(3, 0.7, smoothing=0.01)
    b.load_state_dict(a.state_dict())
    ids = a.draw(rng, 6)
    losses, refs = rng.random(6), rng.random(6)
    np.testing.assert_array_equal(a.step(ids, losses, refs), b.step(ids, losses, refs))
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.average_weights, b.average_weights)
    with pytest.raises(ValueError, match="alpha_sum"):
        b.load_state_dict({**a.state_dict(), "alpha_sum": np.zeros(4)})
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"eg.log_weights": np.zeros(3)})


# ---------------------------------------------------------------------------------------------------
# AMA-S


def spy_on_gains(mixer: AMAS) -> list:
    """Record the gains AMA-S hands to EXP3 (after clipping into [0, 1]) and the resulting xhat."""
    record = []
    update = mixer.exp3.update

    def spy(gains):
        xhat = update(gains)
        record.append((np.array(gains, copy=True), xhat))
        return xhat

    mixer.exp3.update = spy
    return record


@pytest.mark.parametrize("clip", ["example", "task", "none"])
def test_amas_coefficients_are_active_over_batch_size(clip):
    rng = np.random.default_rng(7)
    k, batch = 3, 12
    mixer = AMAS(k, 0.3, clip=clip, batch_shape=(2,))
    ids = mixer.draw(rng, batch)
    losses, refs = rng.random((2, batch)), rng.random((2, batch))
    coeffs = mixer.step(ids, losses, refs)
    for r in range(2):
        active = loop_task_excess(ids[r], losses[r], refs[r], k, clip)[1]
        np.testing.assert_allclose(coeffs[r], active / batch, rtol=1e-15)


def test_amas_coefficients_are_the_gradient_of_the_batch_mean_excess():
    k = 3
    task_ids, features, targets, theta0 = linear_problem(seed=8)
    losses0 = linear_losses(theta0, features, targets)
    refs = refs_with_margins(task_ids, losses0)
    coeffs = AMAS(k, 0.5).step(task_ids, losses0, refs)

    def batch_mean_excess(theta):
        return np.mean(np.maximum(linear_losses(theta, features, targets) - refs, 0.0))

    np.testing.assert_allclose(coeffs @ linear_grads(theta0, features, targets),
                               finite_difference(batch_mean_excess, theta0), rtol=1e-7, atol=1e-8)


def test_amas_draw_per_step_gives_one_task_per_row():
    rng = np.random.default_rng(9)
    mixer = AMAS(4, 0.5, draw_per="step", batch_shape=(200,))
    ids = mixer.draw(rng, 8)
    assert ids.shape == (200, 8)
    assert np.all(ids == ids[:, :1])
    assert set(np.unique(ids[:, 0])) == {0, 1, 2, 3}
    per_example = AMAS(4, 0.5, batch_shape=(200,)).draw(rng, 8)
    assert np.mean(np.all(per_example == per_example[:, :1], axis=1)) < 0.05
    single = AMAS(4, 0.5, draw_per="step").draw(rng, 5)
    assert single.shape == (5,) and np.all(single == single[0])


def test_amas_running_scale_keeps_gains_in_unit_interval():
    rng = np.random.default_rng(10)
    k, batch = 3, 6
    mixer = AMAS(k, 0.2)
    record = spy_on_gains(mixer)
    running = 0.0
    for t in range(30):
        ids = mixer.draw(rng, batch)
        p = mixer.weights.copy()
        losses = rng.random(batch) * (1.0 + t)  # growing losses: the scale has to follow
        refs = rng.random(batch)
        mixer.step(ids, losses, refs)
        g = loop_task_excess(ids, losses, refs, k, "example")[0]
        running = max(running, g.max())
        sums = np.array([np.maximum(losses - refs, 0)[ids == i].sum() for i in range(k)])
        expected = sums / (batch * (running if running > 0 else 1.0))
        gains, xhat = record[-1]
        np.testing.assert_allclose(gains, expected, rtol=1e-12, atol=1e-15)
        assert np.all((gains >= 0) & (gains <= 1))
        np.testing.assert_allclose(xhat, gains / p, rtol=1e-12)
        assert mixer.scale.item() == pytest.approx(running, rel=1e-14)
    assert int(mixer.clipped_gains) == 0
    assert int(mixer.steps) == 30


def test_amas_fixed_scale_counts_clipped_gains():
    rng = np.random.default_rng(11)
    k, batch, scale = 3, 4, 0.3
    mixer = AMAS(k, 0.5, gain_scale=scale, batch_shape=(5,))
    record = spy_on_gains(mixer)
    expected_clipped = 0
    for _ in range(10):
        ids = mixer.draw(rng, batch)
        losses, refs = rng.random((5, batch)), rng.random((5, batch))
        mixer.step(ids, losses, refs)
        for r in range(5):
            raw = np.array([np.maximum(losses[r] - refs[r], 0)[ids[r] == i].sum() for i in range(k)])
            raw /= batch * scale
            expected_clipped += int(np.sum(raw > 1))
            np.testing.assert_allclose(record[-1][0][r], np.minimum(raw, 1.0), rtol=1e-12, atol=1e-15)
    assert expected_clipped > 0
    assert int(mixer.clipped_gains) == expected_clipped


def test_amas_clip_none_counts_negative_gains():
    mixer = AMAS(2, 0.5, gain_scale=1.0, clip="none")
    record = spy_on_gains(mixer)
    ids = np.array([0, 0, 1, 1])
    mixer.step(ids, np.array([0.1, 0.2, 0.9, 0.9]), np.array([0.5, 0.5, 0.1, 0.1]))
    # task 0: mean l - s = -0.35 -> x = 2 * -0.35 / 4 < 0, clipped to 0; task 1: 2 * 0.8 / 4 = 0.4
    np.testing.assert_allclose(record[-1][0], [0.0, 0.4], rtol=1e-12)
    assert int(mixer.clipped_gains) == 1


def test_amas_state_round_trip():
    rng = np.random.default_rng(12)
    a = AMAS(3, 0.3)
    for _ in range(5):
        ids = a.draw(rng, 6)
        a.step(ids, rng.random(6) * 2, rng.random(6))
    b = AMAS(3, 0.3)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.weights, a.weights)
    state = rng.bit_generator.state
    ids_a = a.draw(rng, 6)
    rng.bit_generator.state = state
    ids_b = b.draw(rng, 6)
    np.testing.assert_array_equal(ids_a, ids_b)
    losses, refs = rng.random(6) * 5, rng.random(6)
    a.step(ids_a, losses, refs)
    b.step(ids_b, losses, refs)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.scale, b.scale)
    with pytest.raises(ValueError, match="unexpected"):
        b.load_state_dict({**a.state_dict(), "rng": 0})


@pytest.mark.parametrize("kwargs,name", [
    ({"gain_scale": 0.0}, "gain_scale"),
    ({"gain_scale": -1.0}, "gain_scale"),
    ({"gain_scale": "max"}, "gain_scale"),
    ({"draw_per": "batch"}, "draw_per"),
    ({"clip": "batch"}, "clip"),
    ({"baseline": "teacher"}, "baseline"),
])
def test_amas_bad_options_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AMAS(3, 0.5, **kwargs)


def test_amas_bad_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size"):
        AMAS(3, 0.5).draw(np.random.default_rng(0), 0)


# ---------------------------------------------------------------------------------------------------
# fixed mixtures


def test_fixed_mixture_full_batch_is_the_weighted_task_loss():
    rng = np.random.default_rng(13)
    sizes = [5, 3, 7]
    raw_weights = np.array([1.0, 2.0, 3.0])
    task_ids = rng.permutation(np.repeat(np.arange(3), sizes))
    losses = rng.random(len(task_ids))
    mixer = FixedMixture(raw_weights)
    coeffs = mixer.step(task_ids, losses)
    w = raw_weights / raw_weights.sum()
    task_means = [losses[task_ids == i].mean() for i in range(3)]
    assert coeffs @ losses == pytest.approx(float(np.dot(w, task_means)), rel=1e-13)
    np.testing.assert_allclose(mixer.weights, w, rtol=1e-15)


def test_standard_full_batch_is_the_union_mean():
    rng = np.random.default_rng(14)
    sizes = [4, 9, 2]
    mixer = make_mixer("standard", 3, sizes=sizes)
    task_ids = rng.permutation(np.repeat(np.arange(3), sizes))
    losses = rng.random(len(task_ids))
    coeffs = mixer.step(task_ids, losses)
    assert coeffs @ losses == pytest.approx(losses.mean(), rel=1e-13)
    task_means = np.array([losses[task_ids == i].mean() for i in range(3)])
    assert coeffs @ losses == pytest.approx(float(np.dot(sizes, task_means) / np.sum(sizes)), rel=1e-13)


@pytest.mark.parametrize("batch_shape", [(), (4,)])
def test_standard_sampling_frequencies_match_sizes(batch_shape):
    sizes = np.array([100, 300, 50, 550])
    mixer = make_mixer("standard", 4, sizes=sizes, batch_shape=batch_shape)
    draws = 50_000
    ids = mixer.draw(np.random.default_rng(15), draws)
    assert ids.shape == batch_shape + (draws,)
    probs = sizes / sizes.sum()
    n = ids.size
    freq = np.bincount(ids.ravel(), minlength=4) / n
    std = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) < 5 * std), (freq, probs)
    coeffs = mixer.step(ids, np.ones(ids.shape))
    np.testing.assert_allclose(coeffs, 1.0 / draws)


class AlmostOneRng:
    """Stands in for a Generator whose uniforms all land just below 1."""

    def random(self, shape):
        return np.full(shape, np.nextafter(1.0, 0.0))


def test_draws_never_run_past_the_last_task():
    # ten probabilities of 0.1 have a cumulative sum that ends just below 1 in floating point
    assert np.cumsum(np.full(10, 0.1))[-1] < 1.0  # so a uniform of nextafter(1, 0) is not below it
    for mixer in (AMAS(10, 1.0), make_mixer("standard", 10, sizes=[1] * 10)):
        ids = mixer.draw(AlmostOneRng(), 5)
        np.testing.assert_array_equal(ids, 9)


def test_fixed_mixture_balanced_draw_and_uniform():
    mixer = make_mixer("uniform", 3)
    np.testing.assert_allclose(mixer.weights, 1 / 3)
    ids = mixer.draw(np.random.default_rng(0), 6)
    np.testing.assert_array_equal(np.bincount(ids, minlength=3), [2, 2, 2])
    with pytest.raises(ValueError, match="multiple"):
        mixer.draw(np.random.default_rng(0), 5)
    assert mixer.state_dict() == {"steps": 0}


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [1.0, float("nan")], [[1.0, 2.0]], []])
def test_fixed_mixture_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        FixedMixture(weights)


# ---------------------------------------------------------------------------------------------------
# registry

REQUIRED = {
    "ama-r": {"eta_alpha": 0.5},
    "ama-r-sim": {"eta_alpha": 0.5},
    "ama-s": {"gamma": 0.2},
    "standard": {"sizes": [10, 20, 30]},
    "uniform": {},
    "mixture": {"weights": [0.2, 0.3, 0.5]},
    "doremi": {"eta_alpha": 0.5},
    "odm": {"gamma": 0.2},
}


def test_registry_covers_every_name():
    assert set(REQUIRED) == set(MIXERS)


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("batch_shape", [(), (2,)])
def test_every_mixer_builds_and_steps(name, batch_shape):
    mixer = make_mixer(name, 3, batch_shape=batch_shape, **REQUIRED[name])
    assert isinstance(mixer, Mixer)
    assert mixer.k == 3 and mixer.batch_shape == batch_shape
    w = mixer.weights
    assert w.shape == batch_shape + (3,)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0)
    rng = np.random.default_rng(16)
    ids = mixer.draw(rng, 6)
    assert ids.shape == batch_shape + (6,)
    coeffs = mixer.step(ids, rng.random(ids.shape), rng.random(ids.shape))
    assert coeffs.shape == ids.shape and np.all(np.isfinite(coeffs)) and np.all(coeffs >= 0)
    if name == "mixture":
        np.testing.assert_allclose(w, np.broadcast_to([0.2, 0.3, 0.5], w.shape))
    if name == "standard":
        np.testing.assert_allclose(w, np.broadcast_to([1 / 6, 2 / 6, 3 / 6], w.shape))


def test_ama_defaults():
    amar = make_mixer("ama-r", 3, eta_alpha=0.5)
    assert isinstance(amar, AMAR)
    assert (amar.baseline, amar.clip, amar.objective) == ("specialist", "example", "excess")
    assert np.all(amar.eg.smoothing == 0.0) and np.all(amar.eg.eta == 0.5)
    amas = make_mixer("ama-s", 3, gamma=0.2)
    assert isinstance(amas, AMAS)
    assert (amas.baseline, amas.clip, amas.draw_per, amas.running_scale) == (
        "specialist", "example", "example", True)
    np.testing.assert_allclose(amas.exp3.eta, 0.2 / 3)  # canonical EXP3 eta = gamma / k


def test_doremi_preset():
    mixer = make_mixer("doremi", 3, eta_alpha=0.5)
    assert isinstance(mixer, AMAR)
    assert mixer.baseline == "standard"
    assert mixer.objective == "loss"
    assert mixer.clip == "example"
    np.testing.assert_array_equal(mixer.eg.smoothing, 1e-3)
    # alpha follows the clipped excess over the standard model's losses; theta gets the raw loss weighted by alpha
    ids = np.array([0, 1, 2, 0, 1, 2])
    losses = np.array([1.0, 0.5, 0.2, 0.8, 0.6, 0.4])
    refs = np.array([0.5, 0.7, 0.1, 0.2, 0.2, 0.6])
    coeffs = mixer.step(ids, losses, refs)
    g = loop_task_excess(ids, losses, refs, 3, "example")[0]
    alpha = np.exp(0.5 * g) / np.exp(0.5 * g).sum()
    alpha = (1 - 1e-3) * alpha + 1e-3 / 3
    np.testing.assert_allclose(mixer.weights, alpha, rtol=1e-12)
    np.testing.assert_allclose(coeffs, alpha[ids] / 2, rtol=1e-12)
    # a preset may be overridden
    plain = make_mixer("doremi", 3, eta_alpha=0.5, smoothing=0.0, objective="excess")
    assert np.all(plain.eg.smoothing == 0.0) and plain.objective == "excess" and plain.baseline == "standard"


def test_odm_preset():
    mixer = make_mixer("odm", 3, gamma=0.3, gain_scale=10.0)
    assert isinstance(mixer, AMAS)
    assert mixer.baseline == "none"
    assert mixer.clip == "none"
    record = spy_on_gains(mixer)
    ids = np.array([0, 0, 1, 2])
    losses = np.array([2.0, 4.0, 1.0, 3.0])
    mixer.step(ids, losses, None)
    # gains are the raw training loss summed per task over batch size * scale
    np.testing.assert_allclose(record[-1][0], [6.0 / 40, 1.0 / 40, 3.0 / 40], rtol=1e-14)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown mixer 'amar'"):
        make_mixer("amar", 3)
    with pytest.raises(ValueError, match="ama-r"):  # the message lists the known names
        make_mixer("amar", 3)
    with pytest.raises(ValueError, match="learning_rate"):
        make_mixer("ama-r", 3, eta_alpha=0.5, learning_rate=0.1)
    with pytest.raises(ValueError, match="eta_alpha"):  # lists the valid ones
        make_mixer("ama-s", 3, gamma=0.1, eta_alpha=0.5)
    with pytest.raises(ValueError, match="weights"):
        make_mixer("uniform", 3, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="needs option eta_alpha"):
        make_mixer("ama-r", 3)
    with pytest.raises(ValueError, match="needs option eta_alpha"):
        make_mixer("doremi", 3)
    with pytest.raises(ValueError, match="needs option gamma"):
        make_mixer("ama-s", 3)
    with pytest.raises(ValueError, match="needs option gamma"):
        make_mixer("odm", 3)
    with pytest.raises(ValueError, match="weights"):
        make_mixer("mixture", 3)
    with pytest.raises(ValueError, match="weights"):
        make_mixer("mixture", 3, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="sizes"):
        make_mixer("standard", 3)
    with pytest.raises(ValueError, match="sizes"):
        make_mixer("standard", 3, sizes=[1, 2])
    with pytest.raises(ValueError, match=r"\bk\b"):
        make_mixer("uniform", 0)
    with pytest.raises(ValueError, match="gamma"):
        make_mixer("ama-s", 3, gamma=0.0)
