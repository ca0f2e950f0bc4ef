"""The convex lab against independent references: scipy, grid enumeration, finite differences, theory."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from amalab.convex import bounds
from amalab.convex.algorithms import gap_bound, theta_step_sizes, train_algorithm
from amalab.convex.optimum import solve
from amalab.convex.problems import MultiTaskProblem, make_problem
from amalab.convex.exp3_regret import exp3_regret
from amalab.convex.jobs import NUMERICAL_MODULES, Checkpoints, job_description, numerics_version, rate_job
from amalab.convex.record import log_log_fit
from amalab.convex.losses import get_loss
from amalab.convex.theory_checks import check_rate_curve, failures
from amalab.convex.training import train
from amalab.mixers import make_mixer
from amalab.mixers.excess import excess_loss


@pytest.mark.parametrize("loss", ["dpo", "ipo", "least_squares", "logistic"])
def test_specialists_match_scipy(loss):
    """cvxpy's specialist value equals an SLSQP solution of min_{||u||<=R} L_i(u) (smooth losses)."""
    problem = make_problem(loss, k=2, dim=4, sizes=[60, 40], conflict_angle=90, noise=0.1, radius=1.0, seed=3)
    solved = solve(problem)
    for i, rows in enumerate(problem.slices):
        def mean_loss(u):
            return problem.losses(u, rows=rows).mean()
        ref = minimize(mean_loss, np.zeros(problem.dim), method="SLSQP", tol=1e-12,
                       constraints=[dict(type="ineq", fun=lambda u: problem.radius**2 - u @ u)])
        assert mean_loss(solved.specialists[i]) <= ref.fun + 1e-7
        assert mean_loss(solved.specialists[i]) == pytest.approx(ref.fun, abs=1e-6)
        # a specialist has zero clipped excess on its own task, by definition of s(z)
        assert solved.task_excess(solved.specialists[i])[i] == pytest.approx(0.0, abs=1e-12)


def _one_dimensional(loss: str, seed: int = 0) -> MultiTaskProblem:
    """Two conflicting tasks on a line, so OPT can be found by enumerating u in [-R, R]."""
    rng = np.random.default_rng(seed)
    sizes = np.array([30, 20])
    task = np.repeat([0, 1], sizes)
    x = rng.uniform(0.3, 1.0, size=(50, 1))
    sign = np.where(task == 0, 1.0, -1.0)[:, None] * np.where(rng.random((50, 1)) < 0.8, 1.0, -1.0)
    features, targets = (x * sign, np.zeros(50)) if loss != "least_squares" else (x, (sign * x)[:, 0] * 2)
    return MultiTaskProblem(get_loss(loss), features, targets, task, sizes, np.eye(2, 1), radius=1.5, beta=1.0)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "least_squares"])
@pytest.mark.parametrize("clip", ["example", "task"])
def test_minimax_optimum_matches_grid_enumeration(loss, clip):
    problem = _one_dimensional(loss)
    solved = solve(problem, clip=clip)
    grid = np.linspace(-problem.radius, problem.radius, 300_001)[:, None]
    worst = solved.worst_excess(grid)
    # grid spacing 1e-5 times a slope of at most G bounds the enumeration's own error
    assert solved.opt_value == pytest.approx(worst.min(), abs=solved.G * 1e-5 + 1e-8)
    assert solved.opt_value <= worst.min() + 1e-8
    assert solved.solver_opt_value == pytest.approx(solved.opt_value, abs=1e-7)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "least_squares", "logistic"])
def test_constants_bound_every_point_of_the_ball_and_are_attained(loss):
    problem = make_problem(loss, k=3, dim=5, sizes=[40, 30, 20], conflict_angle=100, noise=0.1, radius=1.0,
                           seed=1)
    solved = solve(problem)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2000, problem.dim))
    u *= problem.radius * rng.random((2000, 1)) ** (1 / problem.dim) / np.linalg.norm(u, axis=1, keepdims=True)
    e = excess_loss(problem.losses(u), solved.spec_losses)
    assert e.max() <= solved.Bl + 1e-12
    # finite-difference gradient norms of e at random points stay under G
    h = 1e-6
    grads = np.stack([(excess_loss(problem.losses(u + h * np.eye(problem.dim)[j]), solved.spec_losses) - e) / h
                      for j in range(problem.dim)], axis=-1)
    assert np.linalg.norm(grads, axis=-1).max() <= solved.G * (1 + 1e-4)
    # both are attained at u = +-R a_z / ||a_z|| for some example z
    a = problem.features / np.linalg.norm(problem.features, axis=1, keepdims=True)
    ends = np.concatenate([a, -a]) * problem.radius
    e_ends = excess_loss(problem.losses(ends), solved.spec_losses)
    assert e_ends.max() == pytest.approx(solved.Bl, rel=1e-12)


@pytest.fixture(scope="module")
def rate_problem():
    return solve(make_problem("dpo", k=3, dim=6, sizes=[80, 50, 30], conflict_angle=100, noise=0.1,
                              radius=1.0, seed=0))


HORIZONS = [2**j for j in range(8, 15)]


@pytest.mark.parametrize("algorithm,seeds", [("ama-r-full", 1), ("ama-r", 12), ("ama-s", 12)])
def test_rates(rate_problem, algorithm, seeds):
    """O(1/sqrt T): slope of the median gap <= -0.4 on the last five horizons (as the reproduction fits
    it), every gap under its bound, none below -tolerance.

    12 seeds: with 6, the median's slope over these horizons ranged from -0.23 to -0.73 across config seeds
    (a coin toss at this gate); with 12 it ranged from -0.45 to -0.64 over config seeds 0-5.
    """
    gap = np.asarray(rate_job(rate_problem, algorithm, HORIZONS, seeds, 12, 0, "dpo")["gap"])
    median = np.median(gap, axis=1)
    assert np.all(gap <= gap_bound(algorithm, rate_problem, HORIZONS)[:, None])
    assert np.all(gap >= -1e-6)
    assert log_log_fit(HORIZONS[-5:], median[-5:])[0] <= -0.4


def test_deterministic_ama_r_converges_to_the_cvxpy_optimum(rate_problem):
    """optax-style: the averaged iterate approaches the known optimum, and the theory's bound holds."""
    T = 2**15
    gap = rate_job(rate_problem, "ama-r-full", [T], 1, 12, 0, "dpo")["gap"][0][0]
    assert 0 <= gap <= 1e-3
    assert gap <= bounds.ama_r_bound(rate_problem.D, rate_problem.G, rate_problem.Bl, 3, T)


def test_ama_beats_standard_on_worst_task(rate_problem):
    """The reason AMA exists: standard alignment on imbalanced data neglects the small tasks."""
    solved = solve(make_problem("dpo", k=3, dim=6, sizes=[600, 60, 20], conflict_angle=110, noise=0.1,
                                radius=1.0, seed=0))
    worst = {}
    for algorithm in ("standard", "ama-r"):
        result = train_algorithm(algorithm, solved, np.full(4, 4096), 12, np.random.default_rng(0))
        worst[algorithm] = result.worst_excess.mean()
    assert worst["ama-r"] - solved.opt_value < 0.25 * (worst["standard"] - solved.opt_value)


def test_same_seed_same_results_and_other_seed_differs(rate_problem):
    a = rate_job(rate_problem, "ama-s", [256, 512], 3, 12, 0, "dpo")["gap"]
    b = rate_job(rate_problem, "ama-s", [256, 512], 3, 12, 0, "dpo")["gap"]
    c = rate_job(rate_problem, "ama-s", [256, 512], 3, 12, 1, "dpo")["gap"]
    assert a == b
    assert a != c
    p, q = make_problem(seed=5), make_problem(seed=5)
    assert np.array_equal(p.features, q.features) and np.array_equal(p.targets, q.targets)
    assert not np.array_equal(p.features, make_problem(seed=6).features)


def test_generator_knobs():
    problem = make_problem("dpo", k=4, dim=7, sizes=[10, 20, 30, 40], conflict_angle=75.0, seed=2)
    cosines = problem.rewards @ problem.rewards.T
    assert np.allclose(np.diag(cosines), 1.0)
    assert np.allclose(cosines[~np.eye(4, dtype=bool)], np.cos(np.radians(75.0)))
    assert problem.sizes.tolist() == [10, 20, 30, 40] and problem.features.shape == (100, 7)
    assert np.allclose(np.linalg.norm(problem.features, axis=1), 1.0)
    # label noise: with no noise and a sharp reward, preferences agree with the hidden reward
    clean = make_problem("dpo", k=2, dim=4, sizes=[2000, 2000], reward_scale=50.0, noise=0.0, seed=0)
    agree = np.einsum("nd,nd->n", clean.features, clean.rewards[clean.task]) > 0
    noisy = make_problem("dpo", k=2, dim=4, sizes=[2000, 2000], reward_scale=50.0, noise=0.3, seed=0)
    agree_noisy = np.einsum("nd,nd->n", noisy.features, noisy.rewards[noisy.task]) > 0
    assert agree.mean() > 0.95
    assert agree_noisy.mean() == pytest.approx(agree.mean() * 0.7 + (1 - agree.mean()) * 0.3, abs=0.03)


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss="kl"), "unknown loss 'kl'"),
    (dict(k=0), "k must be an integer >= 1"),
    (dict(k=2, sizes=[10, -5]), "sizes must be integers >= 1"),
    (dict(k=2, sizes=[10]), "one size per task"),
    (dict(k=3, conflict_angle=150.0), "impossible for k=3"),
    (dict(k=3, dim=2), "dim must be an integer >= k=3"),
    (dict(noise=0.7), "label-flip probability"),
    (dict(radius=0.0), "radius must be a positive number"),
])
def test_generator_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_problem(**{"sizes": [5] * kwargs.get("k", 3), **kwargs})


def _ball_minimum(fun, dim: int, radius: float) -> float:
    """scipy SLSQP over the ball, from several starts (an independent reference for cvxpy)."""
    starts = [np.zeros(dim)] + [radius * 0.5 * v / np.linalg.norm(v) for v in np.random.default_rng(1).normal(size=(4, dim))]
    return min(minimize(fun, x0, method="SLSQP", tol=1e-13,
                        constraints=[dict(type="ineq", fun=lambda u: radius**2 - u @ u)]).fun for x0 in starts)


def test_dual_function_and_standard_solution_match_scipy():
    """min_u sum_i alpha_i E_i(u) (clip "none": smooth) and the standard solution against SLSQP."""
    problem = make_problem("dpo", k=3, dim=4, sizes=[50, 30, 20], seed=4)
    solved = solve(problem, clip="none")
    alpha = np.array([0.5, 0.3, 0.2])
    ref = _ball_minimum(lambda u: solved.task_excess(u) @ alpha, problem.dim, problem.radius)
    theta_bar = np.full(problem.dim, 0.1)
    gap = solved.duality_gap(theta_bar, alpha)[0]
    assert gap == pytest.approx(solved.worst_excess(theta_bar) - ref, abs=1e-7)
    union = _ball_minimum(lambda u: problem.losses(u).mean(), problem.dim, problem.radius)
    assert problem.losses(solved.standard_theta).mean() == pytest.approx(union, abs=1e-7)
    assert solved.base_losses() == pytest.approx(problem.losses(solved.standard_theta))


def test_duality_gap_bounds_the_primal_gap(rate_problem):
    """Weak duality: min_u sum alpha_i E_i(u) <= OPT for every alpha, so duality gap >= primal gap."""
    rng = np.random.default_rng(0)
    theta = rate_problem.problem.project(rng.normal(size=(4, rate_problem.problem.dim)))
    alpha = rng.dirichlet(np.ones(3), size=4)
    primal = rate_problem.worst_excess(theta) - rate_problem.opt_value
    assert np.all(rate_problem.duality_gap(theta, alpha) >= primal - 1e-8)
    # at the minimax optimum with its optimal weights the duality gap closes
    assert rate_problem.duality_gap(rate_problem.opt_theta, np.full(3, 1 / 3))[0] >= -1e-8


GATES = dict(slope_horizons=5, slope_gate=-0.45, duality_slope_gate=-0.45, gap_tolerance=1e-6, exp3_z=3.0)


def _deterministic_rate_checks(solved, eta_alpha_scale: float):
    """The rate checks of deterministic AMA-R on T = 2^8 ... 2^12, its eta_alpha scaled by ``eta_alpha_scale``."""
    horizons = np.array([2**j for j in range(8, 13)])
    eta_alpha = eta_alpha_scale * bounds.alpha_step_size(3, solved.Bl, horizons)
    mixer = make_mixer("ama-r", 3, eta_alpha=eta_alpha, clip=solved.clip, batch_shape=horizons.shape)
    result = train(solved, mixer, horizons, theta_step_sizes(solved, horizons), np.random.default_rng(0))
    gap = (result.worst_excess - solved.opt_value)[:, None]
    dual = solved.duality_gap(result.theta_bar, result.average_weights)
    return check_rate_curve("dpo/ama-r-full", horizons, gap, gap_bound("ama-r-full", solved, horizons), GATES, dual)


def test_rate_checks_pass_for_ama_r_and_fail_for_a_broken_mixer(rate_problem):
    """The checks bind: deterministic AMA-R passes every gate; with eta_alpha = 0 (alpha frozen at
    uniform: the uniform mixture, not the minimax problem) the slope and duality gates fail."""
    good = _deterministic_rate_checks(rate_problem, 1.0)
    assert failures(good) == [], [c.line() for c in good]
    broken = _deterministic_rate_checks(rate_problem, 0.0)
    failed = {c.gate.split(",")[0] for c in failures(broken)}
    assert failed == {"slope of median gap", "slope of duality gap"}, [c.line() for c in broken]


# ------------------------------------------------------------- the compiled engine against the numpy reference

#: every mixer the convex lab can build, and the clip / gain-scale variants the kernel branches on
ENGINE_CASES = [(name, {}) for name in ("ama-r", "ama-r-sim", "ama-s", "standard", "uniform", "doremi", "odm")] + [
    ("ama-r", dict(clip="task")), ("ama-r", dict(clip="none")), ("ama-r-sim", dict(clip="task")),
    ("ama-s", dict(clip="task")), ("ama-s", dict(clip="none")), ("ama-s", dict(gain_scale="running")),
    ("mixture", dict(weights=[0.5, 0.3, 0.2])), ("doremi", dict(smoothing=0.0)),
]


def _engines_agree(solved, name, options, horizons, batch_size, seed=3):
    """Train with both engines from the same generator state; return the two results and mixer states."""
    results, states = [], []
    for engine in ("numpy", "compiled"):
        rates = {} if name in ("standard", "uniform", "mixture") else (
            dict(eta_alpha=bounds.alpha_step_size(3, solved.Bl, horizons)) if name in ("ama-r", "ama-r-sim", "doremi")
            else dict(gamma=bounds.ama_s_gamma(3, horizons)))
        mixer = make_mixer(name, 3, sizes=solved.problem.sizes, batch_shape=horizons.shape, **rates, **options)
        results.append(train(solved, mixer, horizons, theta_step_sizes(solved, horizons), np.random.default_rng(seed),
                             batch_size, curve_steps=[7, 40, 64], engine=engine))
        states.append(mixer.state_dict())
    return results, states


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "least_squares", "logistic"])
def test_compiled_engine_gives_the_numpy_reference_numbers(loss):
    """Same random draws, same numbers to 1e-12 (relative), for every mixer, loss and clip, on short
    horizons; and the mixers are left in the same state (so their average weights agree too)."""
    solved = solve(make_problem(loss, k=3, dim=5, sizes=[40, 30, 20], seed=1))
    horizons = np.array([50, 97, 97])
    cases = ENGINE_CASES + [("ama-r", dict(batch_size=None)), ("uniform", dict(batch_size=None)),
                            ("standard", dict(batch_size=None))]
    for name, options in cases:
        options = dict(options)
        batch_size = options.pop("batch_size", 12)
        (reference, compiled), (ref_state, compiled_state) = _engines_agree(solved, name, options, horizons,
                                                                            batch_size)
        for field in ("theta_bar", "task_excess", "average_weights", "curve"):
            np.testing.assert_allclose(getattr(compiled, field), getattr(reference, field), rtol=1e-12, atol=0,
                                       err_msg=f"{loss} {name} {options} {field}")
        for key, value in ref_state.items():
            np.testing.assert_allclose(compiled_state[key], value, rtol=1e-12, atol=1e-15,
                                       err_msg=f"{loss} {name} {options} state {key}")


@pytest.mark.parametrize("sequence", ["bernoulli", "switching", "sinusoid"])
def test_compiled_exp3_gives_the_numpy_reference_numbers(sequence):
    reference, compiled = (exp3_regret(sequence, 5, [100, 1500, 3000], 7, np.random.default_rng(1), engine=engine)
                           for engine in ("numpy", "compiled"))
    for key, value in reference.items():
        np.testing.assert_allclose(compiled[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


# ----------------------------------------------------------------------------------- job checkpoints

def _checkpointed(folder, solved, numerics="code-1"):
    name = ("rates", "dpo", "ama-r", "256")
    kwargs = dict(solved=solved, algorithm="ama-r", horizons=[256], seeds=2, batch_size=12, seed=0, loss="dpo")
    return Checkpoints(folder, ["/".join(name)], [job_description(name, kwargs, numerics)])


def test_a_checkpoint_is_reused_only_under_the_same_key(tmp_path, monkeypatch):
    """A job's checkpoint is reused for the same problem, solve, settings and code; a changed problem knob,
    a changed generator (same knobs, other data) or changed numerical code makes it stale: recomputed."""
    settings = dict(k=3, dim=4, sizes=[30, 20, 10], seed=0)
    solved = solve(make_problem("dpo", **settings))
    _checkpointed(tmp_path, solved).save(0, dict(gap=[[0.5]]))
    assert _checkpointed(tmp_path, solve(make_problem("dpo", **settings))).load() == ({0: dict(gap=[[0.5]])}, [])

    other_knob = solve(make_problem("dpo", **settings, noise=0.2))
    assert _checkpointed(tmp_path, other_knob).load() == ({}, [0])
    assert _checkpointed(tmp_path, solved, numerics="code-2").load() == ({}, [0])

    problem = make_problem("dpo", **settings)  # another generator: same settings record, other features
    changed = replace(problem, features=problem.project(problem.features + 1e-3))
    assert changed.settings == problem.settings
    assert _checkpointed(tmp_path, solve(changed)).load() == ({}, [0])


def test_numerics_version_changes_with_the_code_of_the_kernel(tmp_path, monkeypatch):
    """Editing the compiled kernel (here: a copy with one more line) gives another numerics version."""
    from amalab.convex import compiled_steps
    assert "amalab.convex.compiled_steps" in NUMERICAL_MODULES and "amalab.mixers.ama_s" in NUMERICAL_MODULES
    assert "amalab.convex.compiled_engine" in NUMERICAL_MODULES  # the kernel's dispatch draws its random numbers
    before = numerics_version()
    edited = tmp_path / "compiled_steps.py"
    edited.write_bytes(Path(compiled_steps.__file__).read_bytes() + b"# edited\n")
    monkeypatch.setattr(compiled_steps, "__file__", str(edited))
    assert numerics_version() != before
